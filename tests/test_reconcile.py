"""Orphan reconciliation with the stub: every row of its table (docs/cloud-adapters.md)
that the E2B and Modal tests do not already cover."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from datetime import timedelta

import pytest
from nats.js import JetStreamContext

from adapters.base import NO_CREDENTIALS, SandboxSpec
from adapters.registry import Registry
from consumers.reconcile import take_turn
from consumers.wiring import open_worker
from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from sandboxer.statuses import StatusStore
from schemas import ErrorCode, ErrorInfo, SandboxState, SandboxStatus, utcnow
from tests.conftest import Start
from tests.helpers import provision, reconcile, stub_sandboxes, wait_for_state


async def test_failed_claims_orphans_expired_and_kept_sandboxes(
    start_worker: Start, settings: Settings, js: JetStreamContext
) -> None:
    await start_worker()
    statuses = await StatusStore.open(js)
    async with Client(settings.nats_url) as client:
        kept = await provision(client, "acme", "profile.burst-sandbox")
        expired = await provision(client, "acme", "profile.burst-sandbox")
        found = await statuses.get(expired.owner, expired.sandbox_id)
        assert found is not None
        status, revision = found
        past = utcnow() - timedelta(seconds=1)
        await statuses.update(status.with_changes(expires_at=past), revision)

        # A provider sandbox whose request failed (say, an ambiguous create that ran out
        # of deliveries), and one nobody claimed at all.
        failed_id = sandbox_id_for("acme", "failed-after-create")
        await statuses.create(
            SandboxStatus(
                sandbox_id=failed_id,
                request_id="failed-after-create",
                tenant="acme",
                profile="profile.burst-sandbox",
                extension_id="ext.saas-stub",
                state=SandboxState.FAILED,
                created_at=utcnow(),
                error=ErrorInfo(code=ErrorCode.PROVIDER_UNAVAILABLE, message="timed out"),
            )
        )
        registry = Registry.load(settings.extensions_dir)
        async with AsyncExitStack() as stack:
            parts = await open_worker(settings, js, stack)
            stub = parts.providers.router.adapter("ext.saas-stub")
            for sandbox_id in (failed_id, sandbox_id_for("acme", "never-claimed")):
                spec = SandboxSpec(
                    sandbox_id=sandbox_id,
                    tenant="acme",
                    deployment="test",
                    profile=registry.profile("profile.burst-sandbox"),
                    ttl_s=60,
                    expires_at=utcnow() + timedelta(seconds=60),
                )
                await stub.provision(spec, NO_CREDENTIALS)
            # Another deployment's sandbox: never listed.
            other = SandboxSpec(
                sandbox_id=sandbox_id_for("acme", "theirs"),
                tenant="acme",
                deployment="staging",
                ttl_s=60,
                expires_at=utcnow(),
                profile=registry.profile("profile.burst-sandbox"),
            )
            await stub.provision(other, NO_CREDENTIALS)

        dry = {
            f.sandbox_id: f.action
            for f in await reconcile(settings, js, dry_run=True, extension_id="ext.saas-stub")
        }
        assert dry == {
            kept.sandbox_id: "keep",
            expired.sandbox_id: "expire",
            failed_id: "destroy",
            sandbox_id_for("acme", "never-claimed"): "destroy",
        }
        assert sum(1 for s in await stub_sandboxes(js) if s["terminated_at"] is None) == 5

        await reconcile(settings, js, extension_id="ext.saas-stub")
        # The expired one goes through the normal destroy, so it is metered.
        done = await wait_for_state(client, expired.sandbox_id, SandboxState.DESTROYED)
        assert done.actual_usd is not None
    alive = {
        s["tags"]["sandboxer_sandbox_id"]
        for s in await stub_sandboxes(js)
        if s["terminated_at"] is None
    }
    assert alive == {kept.sandbox_id, sandbox_id_for("acme", "theirs")}
    assert {
        f.sandbox_id: f.action for f in await reconcile(settings, js, extension_id="ext.saas-stub")
    } == {kept.sandbox_id: "keep"}


async def test_one_of_many_takes_each_turn(js: JetStreamContext) -> None:
    leases = await js.key_value("sandboxer-leases")
    turns = await asyncio.gather(*(take_turn(leases, "job", 60) for _ in range(10)))
    assert sorted(turns) == [False] * 9 + [True]
    assert await take_turn(leases, "job", 60) is False  # not again within the period
    assert await take_turn(leases, "job", 0.001) is True  # a period later


async def test_workers_share_one_periodic_pass(
    start_worker: Start, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandboxer.worker")
    for _ in range(3):
        await start_worker(reconcile_every_s=1.0, reconcile_grace_s=0)
    await asyncio.sleep(4.5)
    passes = caplog.text.count("reconcile: ")
    # One pass per period for the deployment (about 4), not one per worker (about 12).
    assert 2 <= passes <= 6, passes
    lease = await (await js.key_value("sandboxer-leases")).get("reconcile.test")
    assert lease.revision is not None
    assert passes <= lease.revision <= passes + 1  # + a pass that has not logged yet
