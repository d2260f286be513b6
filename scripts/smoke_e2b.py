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

from adapters.base import Credentials
from adapters.e2b import E2BAdapter
from scripts.smoke_common import context, exercise


async def smoke(api_key: str, template: str) -> None:
    registry, adapter_context = context("ext.e2b")
    adapter = E2BAdapter(adapter_context)
    print(f"api: {adapter.config.api_url}")
    await exercise(
        adapter,
        Credentials("platform", {"api_key": api_key}),
        registry.profile("profile.e2b-burst"),
        template=template,
        repeat_create=True,
    )


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
