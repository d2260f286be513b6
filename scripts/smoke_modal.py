"""Operator smoke test of ext.modal against the real Modal API: one CPU sandbox created
through the adapter, confirmed running, found by its tags, terminated, and priced.

    MODAL_TOKEN_ID=ak-... MODAL_TOKEN_SECRET=as-... .venv/bin/python scripts/smoke_modal.py

Without both variables it prints "skipped" and exits 0. It costs a few milli-dollars
(one small CPU sandbox for a few seconds; pass --gpu T4 to try a GPU) and never runs in
CI. Modal's MODAL_SERVER_URL points it elsewhere. The token is never printed.
tests/test_modal.py runs this script against the fake Modal, so it stays in step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import uuid
from datetime import timedelta

from adapters.base import AdapterContext, Credentials, SandboxSpec
from adapters.modal import ModalAdapter
from sandboxer.ids import sandbox_id_for
from sandboxer.registry import Registry
from sandboxer.settings import Settings
from schemas import Resources, utcnow


async def smoke(token_id: str, token_secret: str, gpu: str | None) -> None:
    registry = Registry.load(Settings.from_env().extensions_dir)
    deployment = f"smoke-{socket.gethostname()}"[:60]
    adapter = ModalAdapter(AdapterContext(registry.extensions["ext.modal"], None, deployment))  # type: ignore[arg-type]
    key = Credentials("platform", {"token_id": token_id, "token_secret": token_secret})
    base = registry.profile("profile.burst-sandbox")
    small = Resources(cpu=1, memory_mb=1024, gpu=gpu, gpu_count=1 if gpu else 0)
    profile = base.model_copy(update={"resources": small})
    sandbox_id = sandbox_id_for("smoke", uuid.uuid4().hex)
    spec = SandboxSpec(sandbox_id=sandbox_id, tenant="smoke", deployment=deployment,
                       profile=profile, ttl_s=120,
                       expires_at=utcnow() + timedelta(seconds=120))  # fmt: skip
    print(f"server: {os.environ.get('MODAL_SERVER_URL', 'Modal')}  deployment tag: {deployment}")
    try:
        made = await adapter.provision(spec, key)
        print(f"created   {made.provider_sandbox_id} for {sandbox_id}")
        ready = await adapter.wait_ready(made, key)
        print(f"running   {dict(ready.meter_fields)}")
        found = await adapter.find(spec.tags, key)
        assert [s.provider_sandbox_id for s in found] == [made.provider_sandbox_id], found
        print("found     by its tags")
        await adapter.teardown(made.provider_sandbox_id, key)
        await adapter.teardown(made.provider_sandbox_id, key)  # a second time: gone is fine
        usage = adapter.meter_actual(ready, utcnow())
        print(f"terminated after {usage.duration_s} s: {usage.actual_usd} USD")
    finally:
        await adapter.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gpu", default=None, help="A GPU type, e.g. T4 (default: none).")
    args = parser.parse_args()
    token_id, token_secret = os.environ.get("MODAL_TOKEN_ID"), os.environ.get("MODAL_TOKEN_SECRET")
    if not token_id or not token_secret:
        print("skipped: MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set")
        return 0
    asyncio.run(smoke(token_id, token_secret, args.gpu))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
