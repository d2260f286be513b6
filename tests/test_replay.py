"""Operator replay: republishing stored messages changes nothing already applied and
applies what was missed."""

from __future__ import annotations

import asyncio
import json

from nats.js import JetStreamContext

from consumers.replay import Range
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from sandboxer.topology import read_subject
from schemas import DestroyRequest, ProvisionRequest, SandboxState
from tests.conftest import Start
from tests.helpers import (
    replay_all,
    sandboxer,
    stream_messages,
    stub_sandboxes,
    wait_for_state,
    wait_until_drained,
)


async def provision_and_destroy(client: Client, count: int, destroyed: int) -> list[str]:
    ids = []
    for i in range(count):
        tenant = "acme" if i % 2 else "t1"
        request = ProvisionRequest(
            request_id=f"r{i}", tenant=tenant, profile="profile.burst-sandbox"
        )
        status = await client.provision(request, wait_s=20)
        assert status is not None and status.state is SandboxState.READY
        ids.append(status.sandbox_id)
        if i < destroyed:
            destroy = DestroyRequest(
                request_id=f"d{i}", tenant=tenant, sandbox_id=status.sandbox_id
            )
            done = await client.destroy(destroy, wait_s=20)
            assert done is not None and done.state is SandboxState.DESTROYED
    return ids


async def effects(js: JetStreamContext) -> tuple[int, int, int]:
    """(provider sandboxes, debits, usage records)."""
    ledger = Ledger(js)
    debits = [e for t in ("acme", "t1") for e in await ledger.entries(t) if e.kind == "debit"]
    usage = await stream_messages(js, "BILLING", "billing.usage")
    return len(await stub_sandboxes(js)), len(debits), len({u["record_id"] for _, u in usage})


async def settle_all(js: JetStreamContext) -> None:
    for consumer in ("provisioner-provision", "provisioner-destroy"):
        await wait_until_drained(js, consumer, timeout_s=30)
    for _ in range(300):
        info = await js.consumer_info("SANDBOX_METER", "billing-meter")
        if (info.num_pending, info.num_ack_pending) == (0, 0):
            return
        await asyncio.sleep(0.05)


async def test_replaying_everything_twice_changes_nothing(
    start_worker: Start,
    start_billing: Start,
    settings: Settings,
    js: JetStreamContext,
) -> None:
    await start_worker()
    await start_billing()
    async with Client(settings.nats_url) as client:
        await provision_and_destroy(client, count=12, destroyed=6)
    await settle_all(js)
    before = await effects(js)
    assert before == (12, 6, 6)
    balance = (await Ledger(js).balance("acme")).balance

    dry = await replay_all(js, "sandbox.provision", Range(), dry_run=True)
    assert (dry.replayed, dry.effects["applied"], dry.effects["new"]) == (12, 12, 0)
    for subject in ("sandbox.provision", "sandbox.destroy", "sandbox.meter.>", "billing.usage"):
        summary = await replay_all(js, subject, Range())
        assert summary.effects["new"] == 0, summary.line()
        assert summary.replayed > 0
    await settle_all(js)
    assert await effects(js) == before
    assert (await Ledger(js).balance("acme")).balance == balance

    # A second replay of the same ranges skips the first replay's copies.
    again = await replay_all(js, "sandbox.destroy", Range())
    assert again.replayed == 6 and again.skipped_replays == 6
    await settle_all(js)
    assert await effects(js) == before


async def test_replay_applies_what_was_missed(
    start_worker: Start, settings: Settings, js: JetStreamContext
) -> None:
    await start_worker()
    async with Client(settings.nats_url) as client:
        ids = await provision_and_destroy(client, count=6, destroyed=0)
        # Disaster: three claims lost (a bucket restored from an old backup, say).
        kv = await js.key_value("sandboxer-status")
        for sandbox_id in ids[:3]:
            await kv.purge(f"default.{sandbox_id}")  # acme: no consumer lists it
        dry = await replay_all(js, "sandbox.provision", Range(), dry_run=True)
        assert (dry.effects["new"], dry.effects["applied"]) == (3, 3)
        await replay_all(js, "sandbox.provision", Range())
        for sandbox_id in ids:
            await wait_for_state(client, sandbox_id, SandboxState.READY)
    assert len(await stub_sandboxes(js)) == 6  # the same provider sandboxes, adopted


async def test_ranges_and_tenants(
    start_worker: Start, settings: Settings, js: JetStreamContext
) -> None:
    await start_worker()
    async with Client(settings.nats_url) as client:
        await provision_and_destroy(client, count=8, destroyed=0)
    only_acme = await replay_all(js, "sandbox.provision", Range(), tenant="acme", dry_run=True)
    assert (only_acme.replayed, only_acme.skipped_tenants) == (4, 4)
    # The stream also holds TTL schedules between the provisions: count what is there.
    seqs = [seq async for seq, _, _ in read_subject(js, "SANDBOX_REQUESTS", "sandbox.provision")]
    middle = await replay_all(
        js, "sandbox.provision", Range(from_seq=seqs[2], to_seq=seqs[4]), dry_run=True
    )
    assert (middle.first_seq, middle.last_seq, middle.replayed) == (seqs[2], seqs[4], 3)

    code, out, _ = await sandboxer(
        settings, "replay", "--subject", "sandbox.provision", "--since", "1h", "--dry-run"
    )
    assert code == 0
    assert out.startswith(
        f"would replay 8 message(s) of sandbox.provision (seq {seqs[0]}..{seqs[-1]})"
    )
    assert "8 applied, 0 new" in out

    # Stored, but none in the range: not "nothing stored".
    code, out, _ = await sandboxer(
        settings,
        "replay",
        "--subject",
        "sandbox.provision",
        "--since",
        "1h",
        "--until",
        "1d",
        "--dry-run",
    )
    assert code == 0 and "(none of the 8 stored is in the range)" in out, out
    code, out, _ = await sandboxer(
        settings, "replay", "--subject", "billing.usage", "--dry-run", "--json"
    )
    assert code == 0 and json.loads(out)["stored"] == 0
    code, out, _ = await sandboxer(
        settings, "replay", "--subject", "sandbox.provision", "--dry-run", "--json"
    )
    said = json.loads(out)
    assert (said["replayed"], said["stored"], said["effects"]["applied"]) == (8, 8, 8)
