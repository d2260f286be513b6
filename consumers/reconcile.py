"""Orphan reconciliation (SPEC guarantee 5): the provider sandboxes tagged with this
deployment, compared with their claims in the status bucket.

| claim of the sandbox (by its `sandboxer_sandbox_id` tag)   | action                   |
|------------------------------------------------------------|--------------------------|
| none, `failed`, or naming another provider sandbox         | destroy: an orphan       |
| `provisioning`, on this extension, older than the grace    | adopt: `ready` + started |
| `provisioning`, younger than the grace                     | wait: a worker is on it  |
| `ready` / `destroying`, same sandbox, within its TTL       | keep                     |
| `ready` / `destroying`, past its TTL by more than the grace| expire: destroy request  |
| `destroyed`                                                | destroy again            |

An extension whose sandboxes could not be listed (no key to list them with, or the
provider refused or did not answer) is one `unlisted` finding: a pass that saw nothing
must not read as a pass that found nothing to do.

Adopted and expired sandboxes go through the normal destroy path, so they are metered
and billed once; an orphan is torn down and logged, and bills nobody (its tenant was
told the request failed, or never asked). Sandboxes of another deployment, or without
our tags, are never listed, let alone touched.

Every action is idempotent (CAS on the status, idempotent teardown, deterministic
destroy request ids), so two reconcilers or a reconciler racing a worker do no harm.
Workers still take turns (`take_turn`): one periodic pass per deployment and period,
whatever the number of workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from adapters.base import TAG_DEPLOYMENT, TAG_SANDBOX_ID, TAG_TENANT, Credentials, ProviderSandbox
from consumers.lifecycle import Lifecycle
from consumers.policy import Policies
from sandboxer import observe
from sandboxer.credits import Ledger
from sandboxer.errors import SandboxerError
from sandboxer.statuses import StatusStore
from schemas import SandboxState, SandboxStatus, utcnow

log = logging.getLogger("sandboxer.reconcile")

Action = Literal["adopt", "destroy", "expire", "keep", "wait", "unlisted", "free"]
ACTIONS_TAKEN = ("adopt", "destroy", "expire", "free")


@dataclass(frozen=True)
class Finding:
    """One provider sandbox and what reconciliation does (or, dry, would do) with it."""

    extension_id: str
    provider_sandbox_id: str
    sandbox_id: str | None
    tenant: str | None
    action: Action
    reason: str


def _unlisted(extension_id: str, reason: str) -> Finding:
    log.warning("reconcile %s: cannot list its sandboxes: %s", extension_id, reason)
    observe.RECONCILE_ACTIONS.labels(extension_id, "unlisted").inc()
    return Finding(extension_id, "-", None, None, "unlisted", reason)


class Reconciler:
    """Runs one reconciliation pass over every (or one) loaded extension."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        statuses: StatusStore,
        *,
        grace_s: float = 120.0,
        ledger: Ledger | None = None,
        policies: Policies | None = None,
    ) -> None:
        self._ledger = ledger
        self._policies = policies
        self._router = lifecycle.router
        self._registry = lifecycle.registry
        self._metering = lifecycle.metering
        self._expiry = lifecycle.expiry
        self._deployment = lifecycle.settings.deployment
        self._statuses = statuses
        self._grace = timedelta(seconds=grace_s)

    async def run(self, extension_id: str | None = None, *, dry_run: bool = False) -> list[Finding]:
        """Reconcile and return what was found; with `dry_run`, change nothing."""
        router = self._router
        extensions = [extension_id] if extension_id else router.extension_ids
        byok = await self._byok_accounts()
        findings: list[Finding] = []
        for ext in extensions:
            adapter = router.adapter(ext)
            seen: set[str] = set()
            accounts = await self._accounts(ext, byok.get(ext, []))
            if not accounts:
                findings.append(_unlisted(ext, "no key to list its sandboxes with"))
            for credentials in accounts:
                tags = {TAG_DEPLOYMENT: self._deployment}
                try:
                    with observe.provider_call(ext, "find"):
                        listed = await adapter.find(tags, credentials)
                except SandboxerError as exc:
                    findings.append(_unlisted(ext, f"{exc.code}: {exc}"))
                    continue
                for sandbox in listed:
                    if sandbox.provider_sandbox_id in seen:
                        continue
                    seen.add(sandbox.provider_sandbox_id)
                    finding = await self._one(ext, sandbox, credentials, dry_run)
                    if not dry_run:
                        observe.RECONCILE_ACTIONS.labels(ext, finding.action).inc()
                    if finding.action != "keep":
                        log.warning(
                            "reconcile %s %s (%s): %s%s: %s",
                            ext,
                            sandbox.provider_sandbox_id,
                            finding.sandbox_id or "-",
                            "would " if dry_run else "",
                            finding.action,
                            finding.reason,
                        )
                    findings.append(finding)
        if extension_id is None:
            findings += await self._free_slots(dry_run)
        return findings

    async def _free_slots(self, dry_run: bool) -> list[Finding]:
        """Give back what settled sandboxes still hold (a worker killed between a
        failure's writes): a failed one's credit hold, and a failed or destroyed one's
        provider-account and consumer slots. A destroyed sandbox's credit hold is
        billing's to release, after its debit. Settled for `grace_s` at least."""
        if dry_run or self._ledger is None:
            return []
        found: list[Finding] = []
        cutoff = utcnow() - self._grace
        async for status in self._statuses.all():
            settled = status.state in (SandboxState.FAILED, SandboxState.DESTROYED)
            if not settled or (status.destroyed_at or status.created_at) > cutoff:
                continue
            freed = []
            failed = status.state is SandboxState.FAILED
            if failed and await self._ledger.release(status.tenant, status.sandbox_id):
                freed.append("credit hold")
            if await self._router.free(status):
                freed.append("provider account slot")
            if self._policies and await self._policies.free_slot(status.tenant, status.sandbox_id):
                freed.append("consumer slot")
            if freed:
                ext = status.extension_id or "-"
                reason = f"{status.state.value} but still held: {', '.join(freed)}"
                log.warning("reconcile %s: freed: %s", status.sandbox_id, reason)
                observe.RECONCILE_ACTIONS.labels(ext, "free").inc()
                found.append(
                    Finding(
                        ext,
                        status.provider_sandbox_id or "-",
                        status.sandbox_id,
                        status.tenant,
                        "free",
                        reason,
                    )
                )
        return found

    async def _byok_accounts(self) -> dict[str, list[SandboxStatus]]:
        """One status per tenant key in use, by extension: BYOK sandboxes live in the
        tenants' own provider accounts, which the platform key cannot list."""
        by_path: dict[str, SandboxStatus] = {}
        async for status in self._statuses.all():
            if (
                status.credential_source == "byok"
                and status.credential_path
                and status.state is not SandboxState.DESTROYED
            ):
                by_path.setdefault(status.credential_path, status)
        accounts: dict[str, list[SandboxStatus]] = {}
        for status in by_path.values():
            accounts.setdefault(status.extension_id or "", []).append(status)
        return accounts

    async def _accounts(self, ext: str, byok: Iterable[SandboxStatus]) -> list[Credentials]:
        found = []
        platform = await self._router.platform_credentials(ext)
        if platform is not None:
            found.append(platform)
        for status in byok:
            found.append(await self._router.credentials(status))
        return found

    async def _one(
        self, ext: str, sandbox: ProviderSandbox, credentials: Credentials, dry_run: bool
    ) -> Finding:
        sandbox_id = sandbox.tags.get(TAG_SANDBOX_ID)
        owner = self._registry.owner_of(sandbox.tags.get(TAG_TENANT, ""))
        found = await self._statuses.locate(owner, sandbox_id) if sandbox_id else None
        status = found[0] if found else None
        action, reason = self._judge(ext, sandbox, status, utcnow())
        finding = Finding(
            ext,
            sandbox.provider_sandbox_id,
            sandbox_id,
            status.tenant if status else sandbox.tags.get(TAG_TENANT),
            action,
            reason,
        )
        if dry_run or action in ("keep", "wait"):
            return finding
        if action == "destroy":
            with observe.provider_call(ext, "teardown"):
                await self._router.adapter(ext).teardown(sandbox.provider_sandbox_id, credentials)
        elif action == "adopt":
            assert found is not None
            await self._adopt(ext, sandbox, *found)
        elif action == "expire":
            assert status is not None
            await self._expiry.send_now(status)
        return finding

    def _judge(
        self, ext: str, sandbox: ProviderSandbox, status: SandboxStatus | None, now: datetime
    ) -> tuple[Action, str]:
        if status is None:
            return "destroy", "no claim for this sandbox"
        if status.state is SandboxState.FAILED:
            return "destroy", f"its request failed ({status.error.code if status.error else '-'})"
        if status.state is SandboxState.PROVISIONING:
            if status.extension_id != ext:
                return "destroy", f"the claim moved to {status.extension_id}"
            if now - status.created_at < self._grace:
                return "wait", "claimed recently; a worker may still be creating it"
            return "adopt", "claimed, created, never recorded as ready (a worker died?)"
        if status.provider_sandbox_id != sandbox.provider_sandbox_id or status.extension_id != ext:
            return (
                "destroy",
                f"the claim names {status.provider_sandbox_id} on {status.extension_id}",
            )
        if status.state is SandboxState.DESTROYED:
            return "destroy", "destroyed and metered, yet still running"
        if status.expires_at is not None and now - status.expires_at > self._grace:
            return "expire", f"past its TTL ({status.expires_at.isoformat()})"
        return "keep", status.state.value

    async def _adopt(
        self, ext: str, sandbox: ProviderSandbox, status: SandboxStatus, revision: int
    ) -> None:
        credentials = await self._router.credentials(status)
        # Found by its tags, it does not say which ports it serves: its profile does.
        ports = tuple(self._registry.profile(status.profile).ports)
        sandbox = replace(sandbox, ports=ports)
        ready = await self._router.adapter(ext).wait_ready(sandbox, credentials)
        await self._metering.mark_ready(status, revision, ready)
        if status.expires_at is not None and status.expires_at <= utcnow():
            await self._expiry.send_now(status)


async def take_turn(kv: KeyValue, key: str, period_s: float) -> bool:
    """True for exactly one caller per `period_s` among any number of processes: the
    lease `key` holds when it was last taken, and taking it is a compare-and-set. (A
    little less than a period, so that the next taker's own timer is not a hair late.)"""
    now = time.time()
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        try:
            await kv.create(key, str(now).encode())
            return True
        except KeyWrongLastSequenceError:
            return False  # another process took it first
    if now - float(entry.value or b"0") < 0.9 * period_s:
        return False
    try:
        await kv.update(key, str(now).encode(), last=entry.revision)
        return True
    except KeyWrongLastSequenceError:
        return False
