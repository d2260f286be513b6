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

from adapters.base import Credentials
from adapters.modal import ModalAdapter
from schemas import Resources
from scripts.smoke_common import context, exercise


async def smoke(token_id: str, token_secret: str, gpu: str | None) -> None:
    registry, adapter_context = context("ext.modal")
    small = Resources(cpu=1, memory_mb=1024, gpu=gpu, gpu_count=1 if gpu else 0)
    profile = registry.profile("profile.burst-sandbox").model_copy(update={"resources": small})
    print(f"server: {os.environ.get('MODAL_SERVER_URL', 'Modal')}")
    key = Credentials("platform", {"token_id": token_id, "token_secret": token_secret})
    await exercise(ModalAdapter(adapter_context), key, profile, gone="terminated")


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
