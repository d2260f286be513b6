"""The provisioner: turns `sandbox.provision` and `sandbox.destroy` messages into provider
calls, SandboxStatus changes and meter events.

Every step is safe to repeat, because JetStream delivers at least once:

- the status key (deterministic from tenant and request_id) is the claim: creating it
  succeeds once; later deliveries read it and carry on from its state;
- status changes are compare-and-set on the key's revision, so two workers handling the
  same request cannot both move it forward;
- adapters create idempotently on the sandbox id, and tear down idempotently;
- meter events have deterministic ids (`Nats-Msg-Id`) and are published *before* the
  status change they announce, so a crash in between repeats the event, never loses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import NoReturn

from nats.js import JetStreamContext
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from adapters.base import ProviderSandbox, SandboxAdapter, SandboxSpec, Usage
from consumers.deadletter import H_RETRY
from consumers.delivery import Delivery, KeepAlive, Retry, settle
from sandboxer.credits import Ledger
from sandboxer.errors import InvalidRequest, NoRoute, ProviderRejected, SandboxerError
from sandboxer.ids import sandbox_id_for, ttl_destroy_request_id
from sandboxer.registry import Registry
from sandboxer.routing import Router
from sandboxer.settings import Settings
from sandboxer.state import StaleStatus, StatusStore
from sandboxer.topology import (
    DESTROY_SUBJECT,
    REQUESTS_STREAM,
    meter_subject,
    schedule_subject,
)
from schemas import (
    DestroyRequest,
    ErrorCode,
    ErrorInfo,
    MeterKind,
    Profile,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
    TtlOutOfRange,
    meter_event_adapter,
    meter_event_id,
    utcnow,
)

log = logging.getLogger("sandboxer.provisioner")

#: How long a destroy waits between looks at a sandbox that is still provisioning.
DESTROY_WAIT_S = 2.0


def _schedule_at(moment: datetime) -> str:
    """`@at` time of a schedule, rounded up to the second: never fire before `moment`."""
    utc = moment.astimezone(UTC)
    if utc.microsecond:
        utc = utc.replace(microsecond=0) + timedelta(seconds=1)
    return f"@at {utc.strftime('%Y-%m-%dT%H:%M:%SZ')}"


def _route_number(profile: Profile, status: SandboxStatus) -> int:
    """1 for a sandbox on the first route it could take, 2 after one fallback, ..."""
    routes = profile.routes_for(status.tenant)
    return routes.index(status.extension_id) + 1 if status.extension_id in routes else 1


def _provider_sandbox(status: SandboxStatus) -> ProviderSandbox:
    """The provider sandbox a status records, as the adapter reported it at start.
    (Statuses written before `started_at` was recorded fall back to `ready_at`.)"""
    assert status.provider_sandbox_id is not None
    started_at = status.started_at or status.ready_at or status.created_at
    return ProviderSandbox(
        provider_sandbox_id=status.provider_sandbox_id,
        tags={},
        running=status.state is SandboxState.READY,
        started_at=started_at,
        meter_fields=status.meter_fields or {},
    )


def _attributable(data: bytes) -> tuple[str, str] | None:
    """(tenant, request_id) of a message that failed validation, if both are usable."""
    try:
        body = json.loads(data)
        probe = ProvisionRequest.model_validate(
            {"tenant": body["tenant"], "request_id": body["request_id"], "profile": "profile.x"}
        )
    except (ValueError, TypeError, KeyError, ValidationError):
        return None
    return probe.tenant, probe.request_id


def _validation_summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
    )[:900]


@dataclass
class Provisioner:
    """Handles provision and destroy deliveries. Holds no state of its own (but which
    holds it has checked against the provider's price, to warn once)."""

    js: JetStreamContext
    registry: Registry
    router: Router
    statuses: StatusStore
    settings: Settings
    keepalive: KeepAlive
    ledger: Ledger
    _holds_checked: set[tuple[object, ...]] = field(default_factory=set, init=False, repr=False)

    # -- provision -------------------------------------------------------------------

    async def on_provision(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a ProvisionRequest, acking, retrying or failing it."""
        try:
            request = ProvisionRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = await self._reject_invalid(data, exc)
            await delivery.dead_letter(f"invalid ProvisionRequest: {reason}")
            return
        sandbox_id = sandbox_id_for(request.tenant, request.request_id)
        # partial, not closures: 10,000 handlers in flight each hold these.
        await settle(
            f"provision {sandbox_id}",
            partial(self._provision, request, sandbox_id, delivery),
            delivery,
            self.settings,
            give_up=partial(self._fail, request, sandbox_id),
            rejections_answered=True,
        )

    async def _provision(
        self, request: ProvisionRequest, sandbox_id: str, delivery: Delivery
    ) -> None:
        digest = request.digest()
        reopen = H_RETRY in delivery.headers  # an operator's `sandboxer dlq retry`
        status, revision = await self._claim(request, sandbox_id, digest, reopen=reopen)
        if status.request_digest != digest:
            await self._announce_conflict(request, status)
            return
        if status.state is not SandboxState.PROVISIONING:
            # A redelivery or replay of a request that is already settled: answer again.
            await self.statuses.announce(status)
            return

        assert status.extension_id is not None and status.expires_at is not None
        adapter = self.router.adapter(status.extension_id)
        profile = self.registry.profile(status.profile)
        credentials = await self.router.credentials(status)
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            tenant=request.tenant,
            deployment=self.settings.deployment,
            profile=profile,
            ttl_s=profile.resolve_ttl(request.ttl_s),
            expires_at=status.expires_at,
            template=request.template or profile.template,
            metadata=request.metadata,
        )
        # Credits are held before the provider is called: a tenant that cannot pay for
        # the whole TTL gets `insufficient_credits` and no sandbox. With its own key
        # (BYOK) the tenant pays the provider directly, and nothing is held.
        assert status.estimate_usd is not None
        if status.credential_source != "byok":
            await self.ledger.hold(
                request.tenant,
                sandbox_id,
                status.estimate_usd,
                route=_route_number(profile, status),
            )
        # Scheduled before the provider is called, so even a sandbox whose worker dies
        # mid-create is destroyed at expiry.
        await self._schedule_ttl_destroy(status)
        async with self.keepalive.hold(delivery):
            try:
                sandbox = await adapter.provision(spec, credentials)
            except ProviderRejected as rejected:
                await self._fall_back(request, status, revision, profile, rejected)
            try:
                sandbox = await adapter.wait_ready(sandbox, credentials)
            except SandboxerError as exc:
                if not exc.retryable:  # it will never be ready: do not leave it running
                    await adapter.teardown(sandbox.provider_sandbox_id, credentials)
                raise

        self._check_hold(status, adapter, sandbox)
        await self.mark_ready(status, revision, sandbox)

    def _check_hold(
        self, status: SandboxStatus, adapter: SandboxAdapter, sandbox: ProviderSandbox
    ) -> None:
        """Warn when the provider will bill more for the whole TTL than was held: the
        profile's resources understate what the provider made (an E2B template bigger
        than the profile says, say). The debit stays exact; the hold was just short.
        Checked once per extension, profile and resources, off the steady-state path."""
        seen = (status.extension_id, status.profile, tuple(sorted(sandbox.meter_fields.items())))
        if status.credential_source == "byok" or seen in self._holds_checked:
            return
        if len(self._holds_checked) > 10_000:
            self._holds_checked.clear()
        self._holds_checked.add(seen)
        assert status.expires_at is not None and status.estimate_usd is not None
        lifetime = status.expires_at - status.created_at
        full_ttl_usd = adapter.meter_actual(sandbox, sandbox.started_at + lifetime).actual_usd
        if full_ttl_usd > status.estimate_usd:
            log.warning(
                "provision %s: %s bills %s USD for the whole TTL but %s was held; "
                "profile %s understates the sandbox's resources",
                status.sandbox_id,
                status.extension_id,
                full_ttl_usd,
                status.estimate_usd,
                status.profile,
            )

    async def mark_ready(
        self, status: SandboxStatus, revision: int, sandbox: ProviderSandbox
    ) -> bool:
        """Record a ready provider sandbox on its claim: the `started` meter event first,
        then the status. False if another delivery (or reconciliation) got there first."""
        ready = status.with_changes(
            state=SandboxState.READY,
            provider_sandbox_id=sandbox.provider_sandbox_id,
            ready_at=utcnow(),
            started_at=sandbox.started_at,
            meter_fields=to_jsonable_python(sandbox.meter_fields),
        )
        await self._publish_meter(ready, "started")
        try:
            await self.statuses.update(ready, revision)
        except StaleStatus:
            log.info("provision %s: settled concurrently by another delivery", status.sandbox_id)
            return False
        return True

    async def _fall_back(
        self,
        request: ProvisionRequest,
        status: SandboxStatus,
        revision: int,
        profile: Profile,
        rejected: ProviderRejected,
    ) -> NoReturn:
        """The provider refused before creating anything: move the claim to the next
        eligible route, with a hold for that route's estimate, and deliver the request
        again to try there. Never called for ambiguous errors (timeouts, lost
        connections): a sandbox might exist, and a second one elsewhere would be billed
        twice."""
        try:
            route = await self.router.choose(profile, request.tenant, after=status.extension_id)
        except NoRoute:
            raise rejected from None
        ttl_s = profile.resolve_ttl(request.ttl_s)
        moved = status.with_changes(
            extension_id=route.extension_id,
            estimate_usd=route.adapter.estimate_cost(profile, ttl_s),
            credential_source=route.credentials.source,
            credential_path=route.key.path if route.key else None,
            credential_version=route.key.version if route.key else None,
        )
        log.warning(
            "provision %s: %s refused before creating (%s); falling back to %s",
            status.sandbox_id,
            status.extension_id,
            rejected,
            route.extension_id,
        )
        assert moved.estimate_usd is not None
        if moved.credential_source == "byok":
            await self.ledger.release(request.tenant, status.sandbox_id)
        else:
            await self.ledger.hold(
                request.tenant,
                status.sandbox_id,
                moved.estimate_usd,
                route=_route_number(profile, moved),
            )
        try:
            await self.statuses.update(moved, revision)
        except StaleStatus:
            raise Retry(0.0, "status changed concurrently") from None
        raise Retry(0.0, f"falling back to {route.extension_id}")

    async def _claim(
        self, request: ProvisionRequest, sandbox_id: str, digest: str, *, reopen: bool = False
    ) -> tuple[SandboxStatus, int]:
        """Create the request's `provisioning` status (the idempotency claim), or load the
        status an earlier delivery created. Creating first saves a read on the common
        path: the first delivery.

        With `reopen` (a dead letter retried by an operator), a `failed` status that never
        got past validation and routing (no extension: nothing was held or created) is
        replaced by the new claim, so a fixed request can go through. Any other stored
        answer stands: idempotency wins."""
        try:
            status = await self._first_status(request, sandbox_id, digest)
        except SandboxerError:
            # The request cannot be routed now; if it was claimed before, carry on with
            # the route chosen then.
            found = await self.statuses.get(sandbox_id)
            if found is None:
                raise
            return found
        revision = await self.statuses.create(status)
        if revision is not None:
            return status, revision
        found = await self.statuses.get(sandbox_id)
        if found is None:  # only if an operator deleted the key in between
            raise Retry(DESTROY_WAIT_S, f"claim of {sandbox_id} vanished")
        stored, stored_revision = found
        if reopen and stored.state is SandboxState.FAILED and stored.extension_id is None:
            log.warning(
                "provision %s: failed claim (%s) reopened by a dead-letter retry",
                sandbox_id,
                stored.error.code if stored.error else "-",
            )
            try:
                return status, await self.statuses.update(status, stored_revision)
            except StaleStatus:
                raise Retry(0.0, "status changed concurrently") from None
        return found

    async def _first_status(
        self, request: ProvisionRequest, sandbox_id: str, digest: str
    ) -> SandboxStatus:
        """Validate and route the request; its status before the provider is called."""
        profile = self.registry.profile(request.profile)
        try:
            ttl_s = profile.resolve_ttl(request.ttl_s)
        except TtlOutOfRange as exc:
            raise InvalidRequest(str(exc)) from None
        route = await self.router.choose(profile, request.tenant)
        now = utcnow()
        return SandboxStatus(
            sandbox_id=sandbox_id,
            request_id=request.request_id,
            tenant=request.tenant,
            profile=profile.id,
            extension_id=route.extension_id,
            state=SandboxState.PROVISIONING,
            created_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
            estimate_usd=route.adapter.estimate_cost(profile, ttl_s),
            credential_source=route.credentials.source,
            credential_path=route.key.path if route.key else None,
            credential_version=route.key.version if route.key else None,
            request_digest=digest,
        )

    async def _schedule_ttl_destroy(self, status: SandboxStatus) -> None:
        assert status.expires_at is not None
        destroy = DestroyRequest(
            request_id=ttl_destroy_request_id(status.sandbox_id),
            tenant=status.tenant,
            sandbox_id=status.sandbox_id,
            reason="ttl",
        )
        await self.js.publish(
            schedule_subject(status.sandbox_id),
            destroy.model_dump_json().encode(),
            headers={
                "Nats-Schedule": _schedule_at(status.expires_at),
                "Nats-Schedule-Target": DESTROY_SUBJECT,
            },
        )

    async def _announce_conflict(self, request: ProvisionRequest, status: SandboxStatus) -> None:
        log.warning(
            "provision %s: request_id %s reused with a different body",
            status.sandbox_id,
            request.request_id,
        )
        await self.statuses.announce(
            status.with_changes(
                state=SandboxState.FAILED,
                error=ErrorInfo(
                    code=ErrorCode.IDEMPOTENCY_CONFLICT,
                    message=f"request_id {request.request_id} was already used by "
                    f"tenant {request.tenant} with a different body; the first request "
                    f"stands (sandbox {status.sandbox_id} is {status.state})",
                ),
            )
        )

    async def _reject_invalid(self, data: bytes, exc: ValidationError) -> str:
        """Answer an invalid request with a `failed` status if it can be attributed;
        returns why it is invalid."""
        reason = _validation_summary(exc)
        who = _attributable(data)
        if who is None:
            log.warning("provision: unattributable message: %s", reason)
            return reason
        tenant, request_id = who
        log.warning("provision %s/%s: invalid request: %s", tenant, request_id, reason)
        failed = SandboxStatus(
            sandbox_id=sandbox_id_for(tenant, request_id),
            request_id=request_id,
            tenant=tenant,
            profile="",
            state=SandboxState.FAILED,
            created_at=utcnow(),
            error=ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=reason),
        )
        if await self.statuses.create(failed) is None:
            await self.statuses.announce(failed)
        return reason

    async def _fail(self, request: ProvisionRequest, sandbox_id: str, exc: Exception) -> None:
        """Record the final failure of a provision as a `failed` status."""
        error = self._error_info(exc)
        log.warning("provision %s failed: %s: %s", sandbox_id, error.code, error.message)
        # No sandbox, no bill: give the credits back (a no-op if none were held).
        await self.ledger.release(request.tenant, sandbox_id)
        for _ in range(5):
            found = await self.statuses.get(sandbox_id)
            if found is None:
                failed = SandboxStatus(
                    sandbox_id=sandbox_id,
                    request_id=request.request_id,
                    tenant=request.tenant,
                    profile=request.profile,
                    state=SandboxState.FAILED,
                    created_at=utcnow(),
                    error=error,
                    request_digest=request.digest(),
                )
                if await self.statuses.create(failed) is not None:
                    return
                continue
            status, revision = found
            if status.request_digest != request.digest():
                await self._announce_conflict(request, status)
                return
            if status.state is not SandboxState.PROVISIONING:
                return  # settled by another delivery meanwhile
            try:
                await self.statuses.update(
                    status.with_changes(state=SandboxState.FAILED, error=error), revision
                )
                return
            except StaleStatus:
                continue

    # -- destroy ---------------------------------------------------------------------

    async def on_destroy(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a DestroyRequest."""
        try:
            request = DestroyRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = _validation_summary(exc)
            log.warning("destroy: invalid request: %s", reason)
            await delivery.dead_letter(f"invalid DestroyRequest: {reason}")
            return

        await settle(
            f"destroy {request.sandbox_id}",
            partial(self._destroy, request, delivery),
            delivery,
            self.settings,
            give_up=partial(self._destroy_failed, request),
            retry_transient_forever=True,
        )

    @staticmethod
    async def _destroy_failed(request: DestroyRequest, exc: Exception) -> None:
        # A running sandbox costs money, so provider outages are retried without limit;
        # only errors that retrying cannot fix (or unexpected ones, after max_deliver)
        # get here. The sandbox stays `destroying`; the request is kept as a dead letter
        # for an operator to retry (`sandboxer dlq retry`).
        log.error("destroy %s failed for good: %s", request.sandbox_id, exc)

    async def _destroy(self, request: DestroyRequest, delivery: Delivery) -> None:
        found = await self.statuses.get(request.sandbox_id)
        if found is None or found[0].tenant != request.tenant:
            await self._announce_not_found(request, exists=found is not None)
            return
        status, revision = found
        if status.state is SandboxState.PROVISIONING:
            raise Retry(DESTROY_WAIT_S, "sandbox is still provisioning")
        if status.state in (SandboxState.FAILED, SandboxState.DESTROYED):
            await self.statuses.announce(status)
            return
        if status.state is SandboxState.READY:
            status = status.with_changes(state=SandboxState.DESTROYING)
            try:
                revision = await self.statuses.update(status, revision)
            except StaleStatus:
                raise Retry(0.1, "status changed concurrently") from None

        assert status.extension_id is not None and status.provider_sandbox_id is not None
        adapter = self.router.adapter(status.extension_id)
        if status.destroyed_at is None:
            credentials = await self.router.credentials(status)
            async with self.keepalive.hold(delivery):
                await adapter.teardown(status.provider_sandbox_id, credentials)
            # Record when it stopped before pricing it, so a retried destroy prices the
            # same seconds. A sandbox past its TTL was stopped by the provider at expiry.
            assert status.expires_at is not None
            status = status.with_changes(destroyed_at=min(utcnow(), status.expires_at))
            try:
                revision = await self.statuses.update(status, revision)
            except StaleStatus:
                raise Retry(0.1, "status changed concurrently") from None
        assert status.destroyed_at is not None
        usage = adapter.meter_actual(_provider_sandbox(status), status.destroyed_at)
        destroyed = status.with_changes(state=SandboxState.DESTROYED, actual_usd=usage.actual_usd)
        await self._publish_meter(destroyed, "stopped", usage)
        try:
            await self.statuses.update(destroyed, revision)
        except StaleStatus:
            log.info("destroy %s: settled concurrently by another delivery", status.sandbox_id)
        # The TTL destroy is no longer needed; if it fires anyway it is a no-op.
        await self.js.purge_stream(REQUESTS_STREAM, subject=schedule_subject(status.sandbox_id))

    async def _announce_not_found(self, request: DestroyRequest, *, exists: bool) -> None:
        log.warning("destroy %s by tenant %s: no such sandbox", request.sandbox_id, request.tenant)
        if exists:
            return  # another tenant's sandbox: say nothing on its subject
        await self.statuses.announce(
            SandboxStatus(
                sandbox_id=request.sandbox_id,
                request_id=request.request_id,
                tenant=request.tenant,
                profile="",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=ErrorInfo(
                    code=ErrorCode.NOT_FOUND, message=f"no sandbox {request.sandbox_id}"
                ),
            )
        )

    # -- shared ----------------------------------------------------------------------

    async def _publish_meter(
        self, status: SandboxStatus, kind: MeterKind, usage: Usage | None = None
    ) -> None:
        assert status.extension_id is not None
        event = meter_event_adapter.validate_python(
            {
                **(usage.meter_fields if usage else status.meter_fields or {}),
                "event_id": meter_event_id(status.sandbox_id, kind),
                "kind": kind,
                "extension_id": status.extension_id,
                "sandbox_id": status.sandbox_id,
                "tenant": status.tenant,
                "profile": status.profile,
                "provider_sandbox_id": status.provider_sandbox_id,
                "credential_source": status.credential_source,
                "started_at": usage.started_at if usage else status.started_at,
                "stopped_at": usage.stopped_at if usage else None,
                "duration_s": usage.duration_s if usage else None,
                "estimate_usd": status.estimate_usd,
                "actual_usd": usage.actual_usd if usage else None,
            }
        )
        await self.js.publish(
            meter_subject(status.extension_id),
            meter_event_adapter.dump_json(event),
            headers={"Nats-Msg-Id": event.event_id},
        )

    @staticmethod
    def _error_info(exc: Exception) -> ErrorInfo:
        if isinstance(exc, SandboxerError):
            return ErrorInfo(code=exc.code, message=str(exc)[:1024])
        # An unexpected error: its type says enough; its text may carry internals.
        return ErrorInfo(code=ErrorCode.INTERNAL, message=f"internal error ({type(exc).__name__})")
