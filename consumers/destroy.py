"""The destroy path: `sandbox.destroy` deliveries (the TTL schedule that sends one at a
sandbox's expiry is `consumers/lifecycle.py`).

A destroy loads the status and compares tenants (another tenant's sandbox is
`not_found`), then acts on the state: a `provisioning` sandbox is waited for (nak
with a delay); a `ready` one is marked `destroying`, torn down, its stop recorded,
priced, announced with a `stopped` meter event and stored `destroyed`; a
`destroying` one resumes where the last attempt stopped; a settled one is answered
again. Every step is idempotent, so a redelivery or a replay repeats nothing.
"""

from __future__ import annotations

import logging
from functools import partial

from pydantic import ValidationError

from consumers.delivery import Delivery, Retry, reject_invalid, settle
from consumers.lifecycle import Lifecycle
from consumers.metering import recorded_sandbox
from consumers.policy import Policies
from sandboxer import observe
from sandboxer.errors import Forbidden, NotFound, SandboxerError, error_info
from sandboxer.statuses import StaleStatus, StatusStore
from sandboxer.topology import consumer_of
from schemas import DestroyRequest, SandboxState, SandboxStatus, utcnow

log = logging.getLogger("sandboxer.destroy")

#: How long a destroy waits between looks at a sandbox that is still provisioning.
DESTROY_WAIT_S = 2.0


class Destroying:
    """Handles `sandbox.destroy` deliveries."""

    def __init__(self, lifecycle: Lifecycle, statuses: StatusStore, policies: Policies) -> None:
        self._policies = policies
        self._settings = lifecycle.settings
        self._registry = lifecycle.registry
        self._router = lifecycle.router
        self._keepalive = lifecycle.keepalive
        self._metering = lifecycle.metering
        self._expiry = lifecycle.expiry
        self._statuses = statuses

    async def on_destroy(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a DestroyRequest."""
        try:
            request = DestroyRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = await reject_invalid(delivery, "DestroyRequest", exc)
            log.warning("destroy: invalid request: %s", reason)
            return
        observe.bind(request.sandbox_id, request.tenant)

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
        observe.DESTROYS.labels("", "failed", error_info(exc).code).inc()

    async def _destroy(self, request: DestroyRequest, delivery: Delivery) -> None:
        consumer = consumer_of(delivery.subject)
        try:
            self._registry.authorize(consumer, request.tenant)
        except Forbidden as exc:  # answered, never retried
            await self._answer(request, consumer, exc)
            return
        owner = self._registry.owner_of(request.tenant)
        found = await self._statuses.locate(owner, request.sandbox_id)
        if found is None or found[0].tenant != request.tenant:
            # Another tenant's sandbox gets the same answer as an unknown one.
            log.warning(
                "destroy %s by tenant %s: no such sandbox", request.sandbox_id, request.tenant
            )
            await self._answer(request, consumer, NotFound(f"no sandbox {request.sandbox_id}"))
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
                with observe.provider_call(status.extension_id, "teardown"):
                    await adapter.teardown(status.provider_sandbox_id, credentials)
            # Record when it stopped before pricing it, so a retried destroy prices the
            # same seconds. A sandbox past its TTL was stopped by the provider at expiry.
            assert status.expires_at is not None
            status = status.with_changes(destroyed_at=min(utcnow(), status.expires_at))
            revision = await self._update(status, revision)
        await self._router.free(status)  # its provider account's slot (idempotent)
        await self._policies.free_slot(status.tenant, status.sandbox_id)  # its consumer's
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

    async def _answer(
        self, request: DestroyRequest, consumer: str | None, exc: SandboxerError
    ) -> None:
        """A refusal, announced to whoever asked (never stored: it is no sandbox's)."""
        observe.DESTROYS.labels("", "refused", exc.code).inc()
        await self._statuses.announce(
            SandboxStatus(
                sandbox_id=request.sandbox_id,
                request_id=request.request_id,
                tenant=request.tenant,
                owner=consumer or self._registry.owner_of(request.tenant),
                profile="",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=error_info(exc),
            )
        )
