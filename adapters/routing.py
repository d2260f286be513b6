"""Where a provision is routed: the first extension of the profile's route list whose
adapter is loaded and whose credentials resolve for the tenant (its own key first,
then the platform's). Extensions without a `secret_ref` need no credentials; a
profile that declares ports skips extensions whose sandboxes serve none."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import TYPE_CHECKING

from adapters.base import NO_CREDENTIALS, Credentials, SandboxAdapter
from sandboxer.errors import NoRoute, ProviderUnavailable, QuotaExceeded, UnknownExtension
from schemas import (
    CredentialSource,
    ExtensionManifest,
    Profile,
    SandboxStatus,
    TemplateRecord,
    TenantLimits,
    byok_path,
    logical_template,
    utcnow,
)

if TYPE_CHECKING:  # hvac is imported only where OpenBao is configured
    from adapters.openbao import CredentialResolver, ResolvedKey
    from sandboxer.catalogue import Catalogue
    from sandboxer.credits import Ledger

log = logging.getLogger("adapters.routing")


@dataclass(frozen=True)
class Route:
    """The chosen extension, the key to call it with (None: it needs none) and why the
    routes before it were skipped. Printing a Route never shows a key."""

    extension_id: str
    adapter: SandboxAdapter
    key: ResolvedKey | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: The provider's own template id, when the profile names a logical template.
    template_id: str | None = None

    @property
    def credentials(self) -> Credentials:
        return self.key.credentials if self.key else NO_CREDENTIALS


@dataclass(frozen=True)
class Explanation:
    """What routing makes of each route of a profile for a tenant, in order; `chosen`
    is the extension a provision would use now (None: no route is eligible)."""

    rows: list[tuple[str, str]]
    chosen: str | None

    def as_dict(self) -> dict[str, object]:
        routes = [{"extension_id": ext, "verdict": verdict} for ext, verdict in self.rows]
        return {"chosen": self.chosen, "routes": routes}


def account_of(extension_id: str, source: CredentialSource, tenant: str) -> str:
    """The provider account a sandbox counts against: the platform key's, or the
    tenant's own (BYOK keys never share the platform's counters)."""
    name = extension_id.removeprefix("ext.")
    return f"~{name}-byok-{tenant}" if source == "byok" else f"~{name}-platform"


class Router:
    """Walks a profile's routes in order."""

    def __init__(
        self,
        adapters: dict[str, SandboxAdapter],
        manifests: dict[str, ExtensionManifest] | None = None,
        resolver: CredentialResolver | None = None,
        ledger: Ledger | None = None,
        catalogue: Catalogue | None = None,
    ) -> None:
        self._adapters = adapters
        self._manifests = manifests or {}
        self._resolver = resolver
        #: Where provider accounts' slots are kept (None: account limits unchecked).
        self._ledger = ledger
        #: Where logical templates' readiness is looked up (None: none is ever ready).
        self._catalogue = catalogue

    def adapter(self, extension_id: str) -> SandboxAdapter:
        """The loaded adapter of `extension_id` (for destroy, which must not re-route)."""
        try:
            return self._adapters[extension_id]
        except KeyError:
            raise UnknownExtension(f"extension {extension_id} is not loaded") from None

    @property
    def extension_ids(self) -> list[str]:
        """The extensions whose adapters are loaded."""
        return list(self._adapters)

    async def platform_credentials(self, extension_id: str) -> Credentials | None:
        """The platform's key for `extension_id`: NO_CREDENTIALS if it needs none, None
        if it needs one and there is none (or OpenBao is not configured)."""
        manifest = self._manifests.get(extension_id)
        ref = manifest.secret_ref if manifest else None
        if ref is None:
            return NO_CREDENTIALS
        if self._resolver is None:
            return None
        key = await self._resolver.read(ref.mount, ref.path, ref.keys, "platform")
        return key.credentials if key else None

    async def explain(
        self, profile: Profile, tenant: str, template: str | None = None
    ) -> Explanation:
        """Every route of `profile` for `tenant`, with what routing makes of it: the
        chosen one, why others are skipped, what comes after. No key values."""
        try:
            route = await self.choose(profile, tenant, template=template)
        except NoRoute as exc:
            return Explanation([*exc.skipped, ("-", "no_route: nothing eligible")], None)
        routes = profile.routes_for(tenant)
        chosen_at = routes.index(route.extension_id)
        key = (
            f"{route.key.source} key {route.key.path} v{route.key.version}"
            if route.key
            else "needs no key"
        )
        pinned = " pinned for this tenant" if tenant in profile.pins else ""
        made_from = f", template {route.template_id}" if route.template_id else ""
        rows = [
            *route.skipped,
            (route.extension_id, f"CHOSEN{pinned} ({key}{made_from})"),
            *((ext, "not tried") for ext in routes[chosen_at + 1 :]),
        ]
        return Explanation(rows, route.extension_id)

    async def choose(
        self,
        profile: Profile,
        tenant: str,
        after: str | None = None,
        sandbox_id: str | None = None,
        template: str | None = None,
    ) -> Route:
        """The first eligible route (after the extension `after`, when falling back), or
        `NoRoute` listing why each was skipped. With `sandbox_id`, a slot of the route's
        provider account is taken for it (a full account is skipped); without, the
        account is only looked at (`route explain`). A logical `template`
        (`<name>@<version>`, the request's or else the profile's) skips every provider
        where it is not ready (`template_not_ready`).

        OpenBao being unreachable is `ProviderUnavailable` (retried), not a reason to
        skip: where a sandbox is made must not depend on an outage."""
        skipped: list[tuple[str, str]] = []
        logical = logical_template(template or profile.template)
        record = await self._template(logical) if logical else None
        routes = profile.routes_for(tenant)
        if after is not None:
            routes = routes[routes.index(after) + 1 :] if after in routes else []
        for extension_id in routes:
            adapter = self._adapters.get(extension_id)
            if adapter is None:
                skipped.append((extension_id, "extension not installed"))
                continue
            if profile.ports and not adapter.serves_ports:
                skipped.append((extension_id, "no_ports: its sandboxes serve no ports"))
                continue
            manifest = self._manifests.get(extension_id)
            ref = manifest.secret_ref if manifest else None
            if ref is None:
                route = Route(extension_id, adapter, None, skipped)
            elif self._resolver is None:
                skipped.append((extension_id, "needs a key and OpenBao is not configured"))
                continue
            else:
                key = await self._resolver.resolve(tenant, extension_id, ref)
                if key is None:
                    skipped.append(
                        (extension_id, "no key: neither the tenant's nor the platform's")
                    )
                    continue
                route = Route(extension_id, adapter, key, skipped)
            if logical:
                not_ready = self._not_ready(logical, record, route)
                if not_ready:
                    skipped.append((extension_id, f"template_not_ready: {not_ready}"))
                    continue
                route = replace(
                    route, template_id=record.ready_on(extension_id) if record else None
                )
            full = await self._account_full(manifest, route, tenant, sandbox_id)
            if full:
                skipped.append((extension_id, f"account_full: {full}"))
                continue
            log.debug(
                "route %s for tenant %s: %s (%s key; skipped: %s)",
                profile.id,
                tenant,
                extension_id,
                route.credentials.source,
                skipped or "none",
            )
            return route
        reasons = ", ".join(f"{ext}: {why}" for ext, why in skipped)
        raise NoRoute(f"no eligible route in {profile.id} ({reasons})", skipped=skipped)

    async def _template(self, logical: tuple[str, str]) -> TemplateRecord | None:
        if self._catalogue is None:
            return None
        found = await self._catalogue.get(*logical)
        return found[0] if found else None

    @staticmethod
    def _not_ready(
        logical: tuple[str, str], record: TemplateRecord | None, route: Route
    ) -> str | None:
        """Why the route cannot use the logical template, or None. Templates are
        registered with the platform's key: a tenant's own account (BYOK) has none."""
        if record is None:
            return f"{'@'.join(logical)} was never built (sandboxer template build)"
        if route.credentials.source == "byok":
            return f"{record.reference} is registered on the platform's account, not the tenant's"
        if record.ready_on(route.extension_id) is None:
            return record.why_not_ready(route.extension_id)
        return None

    async def _account_full(
        self,
        manifest: ExtensionManifest | None,
        route: Route,
        tenant: str,
        sandbox_id: str | None,
    ) -> str | None:
        """Why the route's provider account cannot take the sandbox, or None (a slot
        taken for `sandbox_id`, idempotently: a redelivery takes the same one)."""
        if manifest is None or manifest.account_limits is None or self._ledger is None:
            return None
        limits = TenantLimits(**manifest.account_limits.model_dump())
        account = account_of(route.extension_id, route.credentials.source, tenant)
        try:
            if sandbox_id is None:
                balance = await self._ledger.account(account)
                balance.check(limits, "", Decimal(0), utcnow(), who="the account")
            else:
                await self._ledger.hold(
                    account, sandbox_id, Decimal(0), limits=limits, who="the account"
                )
        except QuotaExceeded as exc:
            return f"{account}: {exc}"
        return None

    async def free(self, status: SandboxStatus) -> bool:
        """Give back the account slot a sandbox took (destroyed, failed, moved to
        another route); False if it held none."""
        if self._ledger is None or status.extension_id is None:
            return False
        manifest = self._manifests.get(status.extension_id)
        if manifest is None or manifest.account_limits is None:
            return False
        account = account_of(status.extension_id, status.credential_source, status.tenant)
        return await self._ledger.release(account, status.sandbox_id)

    async def credentials(self, status: SandboxStatus) -> Credentials:
        """The key a sandbox was created with, at the recorded version (or the current
        one if a rotation removed it). For destroy and metering. Where it is read is
        derived from the tenant and the extension, never taken from the status: the
        status says only which of the two keys (BYOK or the platform's) it was."""
        if status.credential_source == "none":
            return NO_CREDENTIALS
        if self._resolver is None:
            raise ProviderUnavailable("the sandbox needs a key and OpenBao is not configured")
        manifest = self._manifests.get(status.extension_id or "")
        if manifest is None or manifest.secret_ref is None:
            raise UnknownExtension(f"extension {status.extension_id} has no secret_ref")
        ref = manifest.secret_ref
        path = (
            byok_path(status.tenant, manifest.id)
            if status.credential_source == "byok"
            else ref.path
        )
        key = await self._resolver.read(
            ref.mount, path, ref.keys, status.credential_source, version=status.credential_version
        )
        if key is None:
            raise ProviderUnavailable(f"the key at {ref.mount}/{path} was deleted")
        return key.credentials
