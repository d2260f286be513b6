"""The destroy path: `sandbox.destroy` deliveries, and the TTL schedule that sends one
at a sandbox's expiry.

A destroy loads the status and compares tenants (another tenant's sandbox is
`not_found`), then acts on the state: a `provisioning` sandbox is waited for (nak
with a delay); a `ready` one is marked `destroying`, torn down, its stop recorded,
priced, announced with a `stopped` meter event and stored `destroyed`; a
`destroying` one resumes where the last attempt stopped; a settled one is answered
again. Every step is idempotent, so a redelivery or a replay repeats nothing.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from functools import partial

from nats.js import JetStreamContext
from pydantic import ValidationError

from adapters.routing import Router
from consumers.delivery import Delivery, KeepAlive, Retry, reject_invalid, settle
from consumers.metering import Metering, recorded_sandbox
from sandboxer.errors import NotFound, error_info
from sandboxer.ids import ttl_destroy_request_id
from sandboxer.settings import Settings
from sandboxer.statuses import StaleStatus, StatusStore
from sandboxer.topology import DESTROY_SUBJECT, REQUESTS_STREAM, schedule_subject
from schemas import DestroyRequest, SandboxState, SandboxStatus, utcnow

log = logging.getLogger("sandboxer.destroy")

#: How long a destroy waits between looks at a sandbox that is still provisioning.
DESTROY_WAIT_S = 2.0


def _schedule_at(moment: datetime) -> str:
    """`@at` time of a schedule, rounded up to the second: never fire before `moment`."""
    utc = moment.astimezone(UTC)
    if utc.microsecond:
        utc = utc.replace(microsecond=0) + timedelta(seconds=1)
    return f"@at {utc.strftime('%Y-%m-%dT%H:%M:%SZ')}"


class Expiry:
    """Each sandbox's TTL destroy, held by nats-server until `expires_at` (a message
    schedule on `sandbox.schedule.<sandbox_id>` that fires onto `sandbox.destroy`)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    @staticmethod
    def request(status: SandboxStatus) -> DestroyRequest:
        """The TTL destroy of a sandbox: always the same request id, so it is one
        request however often it is sent."""
        return DestroyRequest(
            request_id=ttl_destroy_request_id(status.sandbox_id),
            tenant=status.tenant,
            sandbox_id=status.sandbox_id,
            reason="ttl",
        )

    async def schedule(self, status: SandboxStatus) -> None:
        """Have the server send the TTL destroy at `expires_at` (publishing it again
        replaces the schedule)."""
        assert status.expires_at is not None
        await self._js.publish(
            schedule_subject(status.sandbox_id),
            self.request(status).model_dump_json().encode(),
            headers={
                "Nats-Schedule": _schedule_at(status.expires_at),
                "Nats-Schedule-Target": DESTROY_SUBJECT,
            },
        )

    async def send_now(self, status: SandboxStatus) -> None:
        """The TTL destroy, right away (reconciliation of an expired sandbox)."""
        await self._js.publish(DESTROY_SUBJECT, self.request(status).model_dump_json().encode())

    async def cancel(self, sandbox_id: str) -> None:
        """Drop the schedule (the sandbox is gone); if it fires anyway it is a no-op."""
        await self._js.purge_stream(REQUESTS_STREAM, subject=schedule_subject(sandbox_id))


class Destroying:
    """Handles `sandbox.destroy` deliveries."""

    def __init__(
        self,
        *,
        settings: Settings,
        statuses: StatusStore,
        router: Router,
        keepalive: KeepAlive,
        metering: Metering,
        expiry: Expiry,
    ) -> None:
        self._settings = settings
        self._statuses = statuses
        self._router = router
        self._keepalive = keepalive
        self._metering = metering
        self._expiry = expiry

    async def on_destroy(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a DestroyRequest."""
        try:
            request = DestroyRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = await reject_invalid(delivery, "DestroyRequest", exc)
            log.warning("destroy: invalid request: %s", reason)
            return

        await settle(
            f"destroy {request.sandbox_id}",
            partial(self._destroy, request, delivery),
            delivery,
            self._settings,
            give_up=partial(self._failed_for_good, request),
            retry_transient_forever=True,
        )

    @staticmethod
    async def _failed_for_good(request: DestroyRequest, exc: Exception) -> None:
        # A running sandbox costs money, so provider outages are retried without limit;
        # only errors that retrying cannot fix (or unexpected ones, after max_deliver)
        # get here. The sandbox stays `destroying`; the request is kept as a dead letter
        # for an operator to retry (`sandboxer dlq retry`).
        log.error("destroy %s failed for good: %s", request.sandbox_id, exc)

    async def _destroy(self, request: DestroyRequest, delivery: Delivery) -> None:
        found = await self._statuses.get(request.sandbox_id)
        if found is None or found[0].tenant != request.tenant:
            await self._answer_not_found(request, exists=found is not None)
            return
        status, revision = found
        if status.state is SandboxState.PROVISIONING:
            raise Retry(DESTROY_WAIT_S, "sandbox is still provisioning")
        if status.state in (SandboxState.FAILED, SandboxState.DESTROYED):
            await self._statuses.announce(status)
            return
        if status.state is SandboxState.READY:
            status = status.with_changes(state=SandboxState.DESTROYING)
            revision = await self._update(status, revision)

        assert status.extension_id is not None and status.provider_sandbox_id is not None
        adapter = self._router.adapter(status.extension_id)
        if status.destroyed_at is None:
            credentials = await self._router.credentials(status)
            async with self._keepalive.watch(delivery):
                await adapter.teardown(status.provider_sandbox_id, credentials)
            # Record when it stopped before pricing it, so a retried destroy prices the
            # same seconds. A sandbox past its TTL was stopped by the provider at expiry.
            assert status.expires_at is not None
            status = status.with_changes(destroyed_at=min(utcnow(), status.expires_at))
            revision = await self._update(status, revision)
        assert status.destroyed_at is not None
        usage = adapter.meter_actual(recorded_sandbox(status), status.destroyed_at)
        destroyed = status.with_changes(state=SandboxState.DESTROYED, actual_usd=usage.actual_usd)
        await self._metering.publish(destroyed, "stopped", usage)
        try:
            await self._statuses.update(destroyed, revision)
        except StaleStatus:
            log.info("destroy %s: settled concurrently by another delivery", status.sandbox_id)
        await self._expiry.cancel(status.sandbox_id)

    async def _update(self, status: SandboxStatus, revision: int) -> int:
        try:
            return await self._statuses.update(status, revision)
        except StaleStatus:
            raise Retry(0.1, "status changed concurrently") from None

    async def _answer_not_found(self, request: DestroyRequest, *, exists: bool) -> None:
        log.warning("destroy %s by tenant %s: no such sandbox", request.sandbox_id, request.tenant)
        if exists:
            return  # another tenant's sandbox: say nothing on its subject
        await self._statuses.announce(
            SandboxStatus(
                sandbox_id=request.sandbox_id,
                request_id=request.request_id,
                tenant=request.tenant,
                profile="",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=error_info(NotFound(f"no sandbox {request.sandbox_id}")),
            )
        )
