"""Operator smoke test of ext.e2b against the real E2B API: one sandbox created through
the adapter, confirmed running, found by its tags, destroyed, and priced.

    E2B_API_KEY=e2b_... .venv/bin/python scripts/smoke_e2b.py [--template base]

Without E2B_API_KEY it prints "skipped" and exits 0. It costs a few micro-dollars and
never runs in CI. SANDBOXER_E2B_API_URL points it elsewhere (the default is E2B's API).
The key is read from the environment and never printed. tests/test_e2b.py runs this
script against the fake E2B, so it stays in step with the adapter.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import uuid
from datetime import timedelta

from adapters.base import AdapterContext, Credentials, SandboxSpec
from adapters.e2b import E2BAdapter
from sandboxer.ids import sandbox_id_for
from sandboxer.registry import Registry
from sandboxer.settings import Settings
from schemas import utcnow


async def smoke(api_key: str, template: str) -> None:
    registry = Registry.load(Settings.from_env().extensions_dir)
    deployment = f"smoke-{socket.gethostname()}"[:60]
    adapter = E2BAdapter(AdapterContext(registry.extensions["ext.e2b"], None, deployment))  # type: ignore[arg-type]
    key = Credentials("platform", {"api_key": api_key})
    sandbox_id = sandbox_id_for("smoke", uuid.uuid4().hex)
    spec = SandboxSpec(sandbox_id=sandbox_id, tenant="smoke", deployment=deployment,
                       profile=registry.profile("profile.e2b-burst"), ttl_s=120,
                       expires_at=utcnow() + timedelta(seconds=120), template=template)  # fmt: skip
    print(f"api: {adapter.config.api_url}  deployment tag: {deployment}")
    try:
        made = await adapter.provision(spec, key)
        print(f"created   {made.provider_sandbox_id} for {sandbox_id}")
        ready = await adapter.wait_ready(made, key)
        print(f"running   since {ready.started_at.isoformat()}  {dict(ready.meter_fields)}")
        found = await adapter.find(spec.tags, key)
        assert [s.provider_sandbox_id for s in found] == [made.provider_sandbox_id], found
        print("found     by its tags")
        again = await adapter.provision(spec, key)
        assert again.provider_sandbox_id == made.provider_sandbox_id, "idempotency key ignored"
        print("idempotent: a repeated create returned the same sandbox")
        await adapter.teardown(made.provider_sandbox_id, key)
        await adapter.teardown(made.provider_sandbox_id, key)  # a second time: gone is fine
        usage = adapter.meter_actual(ready, utcnow())
        print(f"destroyed after {usage.duration_s} s: {usage.actual_usd} USD")
    finally:
        await adapter.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--template", default="base")
    args = parser.parse_args()
    api_key = os.environ.get("E2B_API_KEY")
    if not api_key:
        print("skipped: E2B_API_KEY is not set")
        return 0
    asyncio.run(smoke(api_key, args.template))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
