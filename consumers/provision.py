"""The provision path: a `sandbox.provision` delivery becomes a claim, a credit hold, a
TTL schedule, a provider sandbox, a `started` meter event and a `ready` status.

Every step is safe to repeat, because JetStream delivers at least once: the claim is
created once (`consumers/claims.py`); the hold's entry id is written once; the TTL
schedule is replaced by publishing it again; adapters create idempotently on the
sandbox id; the meter event has a deterministic id and goes out before the state
change it announces (`consumers/metering.py`).
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import NoReturn

from pydantic import ValidationError

from adapters.base import ProviderSandbox, SandboxAdapter, SandboxSpec
from consumers.claims import Claims, route_fields
from consumers.deadletter import H_RETRY
from consumers.delivery import Delivery, Retry, reject_invalid, settle
from consumers.lifecycle import Lifecycle
from sandboxer import money, observe
from sandboxer.credits import Ledger
from sandboxer.errors import Forbidden, NoRoute, ProviderRejected, SandboxerError, error_info
from sandboxer.ids import sandbox_id_for
from sandboxer.topology import consumer_of
from schemas import Profile, ProvisionRequest, SandboxState, SandboxStatus

log = logging.getLogger("sandboxer.provision")


def ttl_of(status: SandboxStatus) -> int:
    """The TTL a claim was made with (its profile's, or its consumer's default)."""
    assert status.expires_at is not None
    return round((status.expires_at - status.created_at).total_seconds())


class _Attempt:
    """One delivery's work and what is done if it fails for good."""

    __slots__ = ("delivery", "provisioning", "request", "sandbox_id")

    def __init__(
        self,
        provisioning: Provisioning,
        request: ProvisionRequest,
        sandbox_id: str,
        delivery: Delivery,
    ) -> None:
        self.provisioning = provisioning
        self.request = request
        self.sandbox_id = sandbox_id
        self.delivery = delivery

    async def run(self) -> None:
        await self.provisioning._provision(self.request, self.sandbox_id, self.delivery)

    async def give_up(self, exc: Exception) -> None:
        await self.provisioning._give_up(self.request, self.sandbox_id, exc)


class Provisioning:
    """Handles `sandbox.provision` deliveries. Holds no state of its own (but which
    holds it has checked against the provider's price, to warn once)."""

    def __init__(self, lifecycle: Lifecycle, claims: Claims, ledger: Ledger) -> None:
        self._settings = lifecycle.settings
        self._router = lifecycle.router
        self._keepalive = lifecycle.keepalive
        self._metering = lifecycle.metering
        self._expiry = lifecycle.expiry
        self._claims = claims
        self._ledger = ledger
        self._holds_checked: set[tuple[object, ...]] = set()

    async def on_provision(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a ProvisionRequest, acking, retrying or failing it."""
        try:
            request = ProvisionRequest.model_validate_json(data)
        except ValidationError as exc:
            await self._claims.answer_invalid(data, exc, consumer_of(delivery.subject))
            await reject_invalid(delivery, "ProvisionRequest", exc)
            return
        sandbox_id = sandbox_id_for(request.tenant, request.request_id)
        observe.bind(sandbox_id, request.tenant)
        # One slotted object, not two partials: 10,000 handlers in flight each hold it.
        attempt = _Attempt(self, request, sandbox_id, delivery)
        await settle(
            f"provision {sandbox_id}",
            attempt.run,
            delivery,
            self._settings,
            give_up=attempt.give_up,
            rejections_answered=True,
        )

    async def _provision(
        self, request: ProvisionRequest, sandbox_id: str, delivery: Delivery
    ) -> None:
        consumer = consumer_of(delivery.subject)
        try:
            self._claims.registry.authorize(consumer, request.tenant)
        except Forbidden as exc:  # before anything is held, made or stored
            await self._claims.answer_forbidden(request.tenant, request.request_id, consumer, exc)
            return
        digest = request.digest()
        reopen = H_RETRY in delivery.headers  # an operator's `sandboxer dlq retry`
        status, revision = await self._claims.claim(request, sandbox_id, digest, reopen=reopen)
        if status.request_digest != digest:
            await self._claims.answer_conflict(request, status)
            return
        if status.state is not SandboxState.PROVISIONING:
            # A redelivery or replay of a request that is already settled: answer again.
            await self._claims.announce(status)
            return

        assert status.extension_id is not None and status.expires_at is not None
        adapter = self._router.adapter(status.extension_id)
        profile = self._claims.registry.profile(status.profile)
        credentials = await self._router.credentials(status)
        spec = SandboxSpec(
            sandbox_id=sandbox_id,
            tenant=request.tenant,
            deployment=self._settings.deployment,
            profile=profile,
            ttl_s=ttl_of(status),
            expires_at=status.expires_at,
            # A logical template is the provider's own id the route resolved.
            template=status.template_id or request.template or profile.template,
            metadata=request.metadata,
        )
        # Before the provider is called, both at once (one round trip's wait, not two):
        # the credit hold, so that a tenant that cannot pay for the whole TTL gets
        # `insufficient_credits` and no sandbox; and the TTL schedule, so that even a
        # sandbox whose worker dies mid-create is destroyed at expiry (a refused
        # provision's schedule is cancelled by `_give_up`).
        held, scheduled = await asyncio.gather(
            self._hold(profile, status), self._expiry.schedule(status), return_exceptions=True
        )
        for outcome in (held, scheduled):
            if isinstance(outcome, BaseException):
                raise outcome
        async with self._keepalive.watch(delivery):
            extension = status.extension_id
            try:
                with observe.provider_call(extension, "provision"):
                    sandbox = await adapter.provision(spec, credentials)
            except ProviderRejected as rejected:
                await self._fall_back(request, status, revision, profile, rejected)
            try:
                with observe.provider_call(extension, "wait_ready"):
                    sandbox = await adapter.wait_ready(sandbox, credentials)
            except SandboxerError as exc:
                if not exc.retryable:  # it will never be ready: do not leave it running
                    with observe.provider_call(extension, "teardown"):
                        await adapter.teardown(sandbox.provider_sandbox_id, credentials)
                raise

        self._check_hold(status, adapter, sandbox)
        await self._metering.mark_ready(status, revision, sandbox)

    async def _hold(self, profile: Profile, status: SandboxStatus) -> None:
        """Hold the estimate for the sandbox's route (0 for BYOK, which pays its
        provider itself: the hold still counts it against the tenant's limits)."""
        assert status.estimate_usd is not None
        amount = status.estimate_usd if money.pays_with_credits(status.credential_source) else 0
        route = money.route_number(profile, status.tenant, status.extension_id)
        limits = self._claims.policies.limits(status.tenant)
        await self._ledger.hold(
            status.tenant, status.sandbox_id, Decimal(amount), route, limits=limits
        )

    def _check_hold(
        self, status: SandboxStatus, adapter: SandboxAdapter, sandbox: ProviderSandbox
    ) -> None:
        """Warn when the provider will bill more for the whole TTL than was held: the
        profile's resources understate what the provider made (an E2B template bigger
        than the profile says, say). The debit stays exact; the hold was just short.
        Checked once per extension, profile and resources, off the steady-state path."""
        seen = (status.extension_id, status.profile, tuple(sorted(sandbox.meter_fields.items())))
        if not money.pays_with_credits(status.credential_source) or seen in self._holds_checked:
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
            route = await self._router.choose(
                profile,
                request.tenant,
                after=status.extension_id,
                sandbox_id=status.sandbox_id,
                template=request.template,
            )
        except NoRoute:
            raise rejected from None
        moved = status.with_changes(**route_fields(route, profile, ttl_of(status)))
        log.warning(
            "provision %s: %s refused before creating (%s); falling back to %s",
            status.sandbox_id,
            status.extension_id,
            rejected,
            route.extension_id,
        )
        await self._hold(profile, moved)  # replaces the first route's hold
        await self._claims.replace(moved, revision)
        await self._router.free(status)  # the refusing account's slot
        raise Retry(0.0, f"falling back to {route.extension_id}")

    async def _give_up(self, request: ProvisionRequest, sandbox_id: str, exc: Exception) -> None:
        """Record the final failure of a provision as a `failed` status."""
        error = error_info(exc)
        log.warning("provision %s failed: %s: %s", sandbox_id, error.code, error.message)
        # No sandbox, no bill: give the credits back (a no-op if none were held), and
        # the provider account's slot.
        await self._ledger.release(request.tenant, sandbox_id)
        await self._claims.policies.free_slot(request.tenant, sandbox_id)
        await self._expiry.cancel(sandbox_id)  # nothing left to destroy at expiry
        stored = await self._claims.stored(request.tenant, sandbox_id)
        if stored is not None and stored.request_digest == request.digest():
            await self._router.free(stored)
        await self._claims.fail(request, sandbox_id, error)
