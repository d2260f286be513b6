"""What the provider smoke scripts share: one sandbox through an adapter, from create
to a priced teardown, printing each step. Run through `smoke_e2b.py` / `smoke_modal.py`."""

from __future__ import annotations

import socket
import uuid
from dataclasses import replace
from datetime import timedelta

from adapters.base import AdapterContext, Credentials, SandboxAdapter, SandboxSpec
from adapters.registry import Registry
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import Profile, utcnow

DEPLOYMENT = f"smoke-{socket.gethostname()}"[:60]


def context(extension_id: str) -> tuple[Registry, AdapterContext]:
    """The registry, and the adapter context of `extension_id`."""
    settings = replace(Settings.from_env(), deployment=DEPLOYMENT)
    registry = Registry.load(settings.extensions_dir)
    return registry, AdapterContext(registry.extensions[extension_id], settings)


async def exercise(
    adapter: SandboxAdapter,
    key: Credentials,
    profile: Profile,
    *,
    template: str | None = None,
    repeat_create: bool = False,
    gone: str = "destroyed",
) -> None:
    """Create, confirm running, find by tags, (create again,) tear down twice, price."""
    sandbox_id = sandbox_id_for("smoke", uuid.uuid4().hex)
    spec = SandboxSpec(
        sandbox_id=sandbox_id,
        tenant="smoke",
        deployment=DEPLOYMENT,
        profile=profile,
        ttl_s=120,
        template=template,
        expires_at=utcnow() + timedelta(seconds=120),
    )
    print(f"deployment tag: {DEPLOYMENT}")
    try:
        made = await adapter.provision(spec, key)
        print(f"created   {made.provider_sandbox_id} for {sandbox_id}")
        ready = await adapter.wait_ready(made, key)
        print(f"running   since {ready.started_at.isoformat()}  {dict(ready.meter_fields)}")
        found = await adapter.find(spec.tags, key)
        assert [s.provider_sandbox_id for s in found] == [made.provider_sandbox_id], found
        print("found     by its tags")
        if repeat_create:
            again = await adapter.provision(spec, key)
            assert again.provider_sandbox_id == made.provider_sandbox_id, "idempotency ignored"
            print("idempotent: a repeated create returned the same sandbox")
        await adapter.teardown(made.provider_sandbox_id, key)
        await adapter.teardown(made.provider_sandbox_id, key)  # a second time: gone is fine
        usage = adapter.meter_actual(ready, utcnow())
        print(f"{gone} after {usage.duration_s} s: {usage.actual_usd} USD")
    finally:
        await adapter.aclose()
