"""The provision's claim: its status in `sandboxer-status`, created once per
(`tenant`, `request_id`) and moved forward by compare-and-set.

- Creating the key (deterministic from tenant and request_id) is the idempotency
  claim: it succeeds once; later deliveries read it and carry on from its state.
- The status records the route chosen, its estimate and key (never a value), and a
  digest of the body: the same `request_id` with another body is a conflict.
- Answers that must not overwrite the claim (a conflict) are announced, not stored.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.registry import Registry
from adapters.routing import Route, Router
from consumers.delivery import Retry
from consumers.policy import Policies
from sandboxer import observe
from sandboxer.errors import (
    Forbidden,
    IdempotencyConflict,
    InvalidRequest,
    SandboxerError,
    error_info,
    validation_problems,
)
from sandboxer.ids import sandbox_id_for
from sandboxer.statuses import StaleStatus, StatusStore
from schemas import (
    ErrorCode,
    ErrorInfo,
    Profile,
    ProvisionRequest,
    RequestId,
    SandboxState,
    SandboxStatus,
    TenantId,
    TtlOutOfRange,
    utcnow,
)

log = logging.getLogger("sandboxer.claims")

#: How long a delivery waits when its claim vanished under it (an operator's delete).
CLAIM_WAIT_S = 2.0


class _Who(BaseModel):
    """Who a message says it is for, whatever else it holds (parsed by pydantic, whose
    JSON parser refuses deep nesting with an error instead of overflowing a stack)."""

    model_config = ConfigDict(extra="ignore")

    tenant: TenantId
    request_id: RequestId


def _attributable(data: bytes) -> tuple[str, str] | None:
    """(tenant, request_id) of a message that failed validation, if both are usable."""
    try:
        who = _Who.model_validate_json(data)
    except ValidationError:
        return None
    return who.tenant, who.request_id


def route_fields(route: Route, profile: Profile, ttl_s: int) -> dict[str, Any]:
    """What a status records of its route: the extension, the estimate for the TTL, and
    the key's source, path and version (never a value)."""
    return {
        "extension_id": route.extension_id,
        "estimate_usd": route.adapter.estimate_cost(profile, ttl_s),
        "credential_source": route.credentials.source,
        "credential_path": route.key.path if route.key else None,
        "credential_version": route.key.version if route.key else None,
        "template_id": route.template_id,
    }


class Claims:
    """Creates, reads and settles provision claims."""

    def __init__(
        self, registry: Registry, router: Router, statuses: StatusStore, policies: Policies
    ) -> None:
        self.registry = registry
        self.policies = policies
        self._router = router
        self._statuses = statuses

    async def claim(
        self, request: ProvisionRequest, sandbox_id: str, digest: str, *, reopen: bool = False
    ) -> tuple[SandboxStatus, int]:
        """Create the request's `provisioning` status (the idempotency claim), or load the
        status an earlier delivery created. Creating first saves a read on the common
        path: the first delivery.

        With `reopen` (a dead letter retried by an operator), a `failed` status that never
        got past validation and routing (no extension: nothing was held or created) is
        replaced by the new claim, so a fixed request can go through. Any other stored
        answer stands: idempotency wins."""
        owner = self.registry.owner_of(request.tenant)
        try:
            status = await self._first_status(request, sandbox_id, digest)
        except SandboxerError:
            # The request cannot be routed now; if it was claimed before, carry on with
            # the route chosen then.
            found = await self._statuses.get(owner, sandbox_id)
            if found is None:
                raise
            return found
        revision = await self._statuses.create(status)
        if revision is not None:
            return status, revision
        found = await self._statuses.get(owner, sandbox_id)
        if found is None:  # only if an operator deleted the key in between
            raise Retry(CLAIM_WAIT_S, f"claim of {sandbox_id} vanished")
        stored, stored_revision = found
        if reopen and stored.state is SandboxState.FAILED and stored.extension_id is None:
            log.warning(
                "provision %s: failed claim (%s) reopened by a dead-letter retry",
                sandbox_id,
                stored.error.code if stored.error else "-",
            )
            return status, await self.replace(status, stored_revision)
        return found

    async def _first_status(
        self, request: ProvisionRequest, sandbox_id: str, digest: str
    ) -> SandboxStatus:
        """Validate, admit and route the request; its status before the provider is
        called."""
        profile = self.registry.profile(request.profile)
        asked = self.policies.admit(request.tenant, profile, request.ttl_s)
        try:
            ttl_s = profile.resolve_ttl(asked)
        except TtlOutOfRange as exc:
            raise InvalidRequest(str(exc)) from None
        await self.policies.take_slot(request.tenant, sandbox_id)  # the consumer's, as a whole
        route = await self._router.choose(
            profile, request.tenant, sandbox_id=sandbox_id, template=request.template
        )
        now = utcnow()
        return SandboxStatus(
            sandbox_id=sandbox_id,
            request_id=request.request_id,
            tenant=request.tenant,
            owner=self.registry.owner_of(request.tenant),
            profile=profile.id,
            state=SandboxState.PROVISIONING,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            request_digest=digest,
            **route_fields(route, profile, ttl_s),
        )

    async def stored(self, tenant: str, sandbox_id: str) -> SandboxStatus | None:
        """The stored status of a tenant's sandbox, if any."""
        found = await self._statuses.get(self.registry.owner_of(tenant), sandbox_id)
        return found[0] if found else None

    async def replace(self, status: SandboxStatus, revision: int) -> int:
        """Store `status` over the one read at `revision`; a concurrent change is
        retried by a later delivery."""
        try:
            return await self._statuses.update(status, revision)
        except StaleStatus:
            raise Retry(0.0, "status changed concurrently") from None

    async def announce(self, status: SandboxStatus) -> None:
        """Answer a request again with its stored status (a redelivery or a replay)."""
        await self._statuses.announce(status)

    async def answer_conflict(self, request: ProvisionRequest, status: SandboxStatus) -> None:
        """Tell the publisher its `request_id` is taken by another body; the stored
        status (the first request) stands."""
        log.warning(
            "provision %s: request_id %s reused with a different body",
            status.sandbox_id,
            request.request_id,
        )
        conflict = IdempotencyConflict(
            f"request_id {request.request_id} was already used by tenant {request.tenant} "
            f"with a different body; the first request stands (sandbox "
            f"{status.sandbox_id} is {status.state})"
        )
        refusal = status.with_changes(state=SandboxState.FAILED, error=error_info(conflict))
        observe.PROVISIONS.labels(status.extension_id or "", "refused", conflict.code).inc()
        await self._statuses.announce(refusal)

    async def answer_invalid(self, data: bytes, exc: ValidationError, consumer: str | None) -> None:
        """Answer an invalid request with a `failed` status if it can be attributed to a
        tenant its publisher (`consumer`) may act for; stored, so that a redelivery gets
        the same answer."""
        reason = validation_problems(exc)
        who = _attributable(data)
        if who is None:
            log.warning("provision: unattributable message: %s", reason)
            return
        tenant, request_id = who
        log.warning("provision %s/%s: invalid request: %s", tenant, request_id, reason)
        try:
            self.registry.authorize(consumer, tenant)
        except Forbidden as forbidden:
            await self.answer_forbidden(tenant, request_id, consumer, forbidden)
            return
        failed = SandboxStatus(
            sandbox_id=sandbox_id_for(tenant, request_id),
            request_id=request_id,
            tenant=tenant,
            owner=self.registry.owner_of(tenant),
            profile="",
            state=SandboxState.FAILED,
            created_at=utcnow(),
            error=ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=reason),
        )
        if await self._statuses.create(failed) is None:
            await self._statuses.announce(failed)

    async def answer_forbidden(
        self, tenant: str, request_id: str, consumer: str | None, exc: Forbidden
    ) -> None:
        """Tell a publisher it may not act for `tenant`: announced on its own subjects,
        never stored (the claim of that tenant's request id stays free)."""
        log.warning("consumer %s: %s", consumer, exc)
        observe.PROVISIONS.labels("", "refused", exc.code).inc()
        await self._statuses.announce(
            SandboxStatus(
                sandbox_id=sandbox_id_for(tenant, request_id),
                request_id=request_id,
                tenant=tenant,
                owner=consumer or self.registry.owner_of(tenant),
                profile="",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=error_info(exc),
            )
        )

    async def fail(self, request: ProvisionRequest, sandbox_id: str, error: ErrorInfo) -> None:
        """Record the final failure of a provision as its `failed` status, unless another
        delivery settled it meanwhile."""
        digest = request.digest()
        owner = self.registry.owner_of(request.tenant)
        for _ in range(5):
            found = await self._statuses.get(owner, sandbox_id)
            if found is None:
                failed = SandboxStatus(
                    sandbox_id=sandbox_id,
                    request_id=request.request_id,
                    tenant=request.tenant,
                    owner=owner,
                    profile=request.profile,
                    state=SandboxState.FAILED,
                    created_at=utcnow(),
                    error=error,
                    request_digest=digest,
                )
                if await self._statuses.create(failed) is not None:
                    return
                continue
            status, revision = found
            if status.request_digest != digest:
                await self.answer_conflict(request, status)
                return
            if status.state is not SandboxState.PROVISIONING:
                return  # settled by another delivery meanwhile
            try:
                await self._statuses.update(
                    status.with_changes(state=SandboxState.FAILED, error=error), revision
                )
                return
            except StaleStatus:
                continue
