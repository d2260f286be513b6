"""Consumer policy: what each tenant may ask for and how much it may use
(docs/policy.md).

- **What it may ask for** (`Policies.admit`): the profiles, GPU types and TTLs its
  consumer profile (`extensions/consumer.<name>.yaml`) allows; anything else is
  `policy_denied`, before anything is routed, held or made.
- **How much it may use** (`Policies.limits`): concurrency, create rate and hourly and
  daily spend caps, from the consumer profile or an operator's override in the
  `sandboxer-policy` bucket (`sandboxer policy set`). They are enforced by the credits
  journal, in the append that places the hold (`Balance.check`): one serialized
  decision per tenant, across every worker, so concurrent requests cannot overshoot.

Overrides are read when a worker starts and every `REFRESH_S` seconds after; no
request waits for a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from decimal import Decimal

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from adapters.registry import Registry
from sandboxer.credits import Ledger
from sandboxer.errors import PolicyDenied
from sandboxer.topology import POLICY_BUCKET, kv_entries
from schemas import LimitsOverride, Profile, TenantLimits

log = logging.getLogger("sandboxer.policy")

#: How often a worker reads the operators' overrides again.
REFRESH_S = 2.0


def override_key(tenant: str) -> str:
    return f"tenant.{tenant}"


def consumer_journal(name: str) -> str:
    """The journal of a consumer's slots as a whole."""
    return f"~consumer-{name}"


class Policies:
    """The effective policy of every tenant, in memory."""

    def __init__(self, registry: Registry, ledger: Ledger | None = None) -> None:
        self._registry = registry
        #: Where a consumer's slots as a whole are kept (None: not checked).
        self._ledger = ledger
        self._overrides: dict[str, LimitsOverride] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, js: JetStreamContext) -> None:
        """Read the overrides now, then keep reading them."""
        await self.refresh(js)
        self._task = asyncio.create_task(self._refresh_forever(js), name="policy-refresh")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self, js: JetStreamContext) -> None:
        """The overrides as stored now (an unreadable one is logged and left out)."""
        found: dict[str, LimitsOverride] = {}
        try:
            async for _, value in kv_entries(js, POLICY_BUCKET):
                try:
                    override = LimitsOverride.model_validate_json(value)
                except ValidationError:
                    log.warning("policy: an override that is no LimitsOverride, skipped")
                    continue
                found[override.tenant] = override
        except NotFoundError:
            return  # no bucket yet: no overrides
        self._overrides = found

    async def _refresh_forever(self, js: JetStreamContext) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh(js)
            except Exception as exc:  # an outage: keep what was read, try again
                log.warning("policy: overrides not refreshed: %s", type(exc).__name__)

    def override(self, tenant: str) -> LimitsOverride | None:
        return self._overrides.get(tenant)

    def limits(self, tenant: str) -> TenantLimits | None:
        """The tenant's limits: an operator's override, else its consumer profile's;
        None when it has none."""
        override = self._overrides.get(tenant)
        if override is not None:
            limits = override.limits
        else:
            consumer = self._registry.consumer_of(tenant)
            limits = consumer.tenant_limits if consumer else TenantLimits()
        return None if limits.unlimited else limits

    def admit(self, tenant: str, profile: Profile, ttl_s: int | None) -> int | None:
        """The TTL to ask `profile` for (the consumer's default when the request gives
        none), or `PolicyDenied` if the tenant's consumer does not allow the request."""
        consumer = self._registry.consumer_of(tenant)
        if consumer is None:
            return ttl_s
        who = f"{consumer.id} (tenant {tenant})"
        if consumer.profiles is not None and profile.id not in consumer.profiles:
            raise PolicyDenied(f"{who} may not use {profile.id}")
        gpu = profile.resources.gpu
        if gpu and consumer.gpu_types is not None and gpu not in consumer.gpu_types:
            allowed = ", ".join(consumer.gpu_types) or "none"
            raise PolicyDenied(f"{who} may not have GPU {gpu} (allowed: {allowed})")
        limit = consumer.ttl.max_s
        if ttl_s is None and consumer.ttl.default_s is not None:
            ttl_s = min(max(consumer.ttl.default_s, profile.ttl.min_s), profile.ttl.max_s)
        if limit is not None and (ttl_s or profile.ttl.default_s) > limit:
            raise PolicyDenied(
                f"{who} may not ask for a TTL of {ttl_s or profile.ttl.default_s} s "
                f"(its longest: {limit} s)"
            )
        return ttl_s

    async def take_slot(self, tenant: str, sandbox_id: str) -> None:
        """Take one of the tenant's consumer's slots as a whole (`max_concurrent` of the
        consumer profile), or `QuotaExceeded`; idempotent for a sandbox."""
        consumer = self._registry.consumer_of(tenant)
        if consumer is None or consumer.max_concurrent is None or self._ledger is None:
            return
        limits = TenantLimits(max_concurrent=consumer.max_concurrent)
        who = f"{consumer.id} (all its tenants)"
        await self._ledger.hold(
            consumer_journal(consumer.name), sandbox_id, Decimal(0), limits=limits, who=who
        )

    async def free_slot(self, tenant: str, sandbox_id: str) -> bool:
        """Give the consumer's slot back (destroyed, failed); False if it held none."""
        consumer = self._registry.consumer_of(tenant)
        if consumer is None or consumer.max_concurrent is None or self._ledger is None:
            return False
        return await self._ledger.release(consumer_journal(consumer.name), sandbox_id)

    def allow_lifetime(self, tenant: str, lifetime_s: float) -> None:
        """`PolicyDenied` if the tenant's consumer allows no sandbox to live so long (an
        extension's new lifetime)."""
        consumer = self._registry.consumer_of(tenant)
        longest = consumer.ttl.max_s if consumer else None
        if consumer is not None and longest is not None and lifetime_s > longest:
            raise PolicyDenied(
                f"{consumer.id} (tenant {tenant}) may not have a sandbox live "
                f"{lifetime_s:.0f} s (its longest: {longest} s)"
            )
