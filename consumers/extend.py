"""The extend path: a `sandbox.extend` delivery gives a ready sandbox a later
`expires_at`, within its profile's limits.

In order, each step safe to repeat: the credit hold grows to the estimate for the new
lifetime (refused with `insufficient_credits`, nothing changed, if the tenant cannot
cover it); the provider is told the new end (an absolute time); the TTL schedule is
published again (which replaces it); the status records the new expiry, the new
estimate and the request id (compare-and-set), and so announces it. A request id the
status already records changes nothing; refusals are announced with the sandbox's
status and the reason in `error`, never stored.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from functools import partial

from pydantic import ValidationError

from consumers.delivery import Delivery, Retry, reject_invalid, settle
from consumers.lifecycle import Lifecycle
from consumers.metering import reach_fields
from consumers.policy import Policies
from sandboxer import money, observe
from sandboxer.credits import Ledger
from sandboxer.errors import Forbidden, InvalidRequest, NotFound, ProviderRejected, error_info
from sandboxer.statuses import StaleStatus, StatusStore
from sandboxer.topology import consumer_of
from schemas import (
    MAX_TTL_EXTENSIONS,
    ExtendRequest,
    SandboxState,
    SandboxStatus,
    TtlExtension,
    utcnow,
)

log = logging.getLogger("sandboxer.extend")

#: How long an extend waits between looks at a sandbox that is still provisioning.
EXTEND_WAIT_S = 2.0


class Extending:
    """Handles `sandbox.extend` deliveries."""

    def __init__(
        self, lifecycle: Lifecycle, statuses: StatusStore, ledger: Ledger, policies: Policies
    ) -> None:
        self._policies = policies
        self._settings = lifecycle.settings
        self._registry = lifecycle.registry
        self._router = lifecycle.router
        self._expiry = lifecycle.expiry
        self._statuses = statuses
        self._ledger = ledger

    async def on_extend(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of an ExtendRequest."""
        try:
            request = ExtendRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = await reject_invalid(delivery, "ExtendRequest", exc)
            log.warning("extend: invalid request: %s", reason)
            return
        observe.bind(request.sandbox_id, request.tenant)
        await settle(
            f"extend {request.sandbox_id}",
            partial(self._extend, request, delivery),
            delivery,
            self._settings,
            give_up=partial(self._give_up, request, delivery),
            rejections_answered=True,
        )

    async def _extend(self, request: ExtendRequest, delivery: Delivery) -> None:
        consumer = consumer_of(delivery.subject)
        self._registry.authorize(consumer, request.tenant)
        owner = self._registry.owner_of(request.tenant)
        found = await self._statuses.locate(owner, request.sandbox_id)
        if found is None or found[0].tenant != request.tenant:
            raise NotFound(f"no sandbox {request.sandbox_id}")
        status, revision = found
        if any(x.request_id == request.request_id for x in status.ttl_extensions):
            await self._statuses.announce(status)  # applied before: answer again
            return
        if status.state is SandboxState.PROVISIONING:
            raise Retry(EXTEND_WAIT_S, "sandbox is still provisioning")
        if status.state is not SandboxState.READY:
            raise InvalidRequest(f"{status.sandbox_id} is {status.state.value}: not extended")
        assert status.extension_id is not None and status.provider_sandbox_id is not None
        adapter = self._router.adapter(status.extension_id)
        if not adapter.can_extend:
            raise ProviderRejected(
                f"{status.extension_id} cannot extend a running sandbox (docs/reachability.md)"
            )
        expires_at = self._new_expiry(request, status)
        profile = self._registry.profile(status.profile)
        lifetime_s = math.ceil((expires_at - status.created_at).total_seconds())
        estimate = adapter.estimate_cost(profile, lifetime_s)
        credentials = await self._router.credentials(status)
        grows = money.pays_with_credits(status.credential_source)
        if grows:  # first: a tenant who cannot pay for it gets nothing changed
            await self._ledger.rehold(
                status.tenant,
                status.sandbox_id,
                estimate,
                request.request_id,
                limits=self._policies.limits(status.tenant),
            )
        try:
            with observe.provider_call(status.extension_id, "extend"):
                await adapter.extend(status.provider_sandbox_id, expires_at, credentials)
        except ProviderRejected:
            if grows and status.estimate_usd is not None:  # give the credits back
                await self._ledger.rehold(
                    status.tenant,
                    status.sandbox_id,
                    status.estimate_usd,
                    f"{request.request_id}-undo",
                )
            raise
        extended = status.with_changes(
            expires_at=expires_at,
            estimate_usd=estimate,
            ttl_extensions=[
                *status.ttl_extensions,
                TtlExtension(request_id=request.request_id, expires_at=expires_at),
            ],
        )
        extended = extended.with_changes(**reach_fields(status.endpoints, status.control, extended))
        await self._expiry.schedule(extended)
        try:
            await self._statuses.update(extended, revision)
        except StaleStatus:
            raise Retry(0.1, "status changed concurrently") from None
        log.info("extend %s: expires at %s", status.sandbox_id, expires_at.isoformat())

    def _new_expiry(self, request: ExtendRequest, status: SandboxStatus) -> datetime:
        """The expiry the request asks for, or `InvalidRequest` if the profile does not
        allow it or it is no extension."""
        assert status.expires_at is not None
        if len(status.ttl_extensions) >= MAX_TTL_EXTENSIONS:
            raise InvalidRequest(f"{status.sandbox_id} was extended {MAX_TTL_EXTENSIONS} times")
        if request.ttl_s is not None:
            expires_at = status.created_at + timedelta(seconds=request.ttl_s)
        else:
            assert request.add_s is not None
            expires_at = status.expires_at + timedelta(seconds=request.add_s)
        limits = self._registry.profile(status.profile).ttl
        lifetime_s = (expires_at - status.created_at).total_seconds()
        self._policies.allow_lifetime(status.tenant, lifetime_s)
        if lifetime_s > limits.max_s:
            raise InvalidRequest(
                f"a lifetime of {lifetime_s:.0f} s is beyond {status.profile}'s "
                f"limit of {limits.max_s} s"
            )
        if expires_at <= max(status.expires_at, utcnow()):
            raise InvalidRequest(
                f"{status.sandbox_id} already lives until {status.expires_at.isoformat()}; "
                "an extension must end later"
            )
        return expires_at

    async def _give_up(self, request: ExtendRequest, delivery: Delivery, exc: Exception) -> None:
        """Tell the asker why the sandbox was not extended: its status as it is, with
        the reason in `error` (announced, never stored); a stranger's or unknown one
        gets a `failed` placeholder, as a destroy would."""
        error = error_info(exc)
        log.warning("extend %s refused: %s: %s", request.sandbox_id, error.code, error.message)
        consumer = consumer_of(delivery.subject)
        owner = consumer or self._registry.owner_of(request.tenant)
        found = None
        if not isinstance(exc, Forbidden | NotFound):
            found = await self._statuses.get(
                self._registry.owner_of(request.tenant), request.sandbox_id
            )
        if found is not None and found[0].tenant == request.tenant:
            await self._statuses.announce(found[0].with_changes(error=error))
            return
        await self._statuses.announce(
            SandboxStatus(
                sandbox_id=request.sandbox_id,
                request_id=request.request_id,
                tenant=request.tenant,
                owner=owner,
                profile="",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=error,
            )
        )
