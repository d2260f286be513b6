"""Scale-out: several worker and billing processes share the durable consumers; each
request is handled by exactly one of them, and stopping one (SIGTERM) drains it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Awaitable, Callable
from decimal import Decimal

from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import DestroyRequest, ProvisionRequest, SandboxState
from tests.helpers import deliveries, stream_messages, stub_sandboxes

Spawn = Callable[..., subprocess.Popen[bytes]]


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.1)


async def test_three_workers_and_two_billing_processes_share_the_work(
    spawn_worker: Spawn, spawn_billing: Spawn, settings: Settings, js: JetStreamContext
) -> None:
    workers = [spawn_worker(SANDBOXER_STUB_LATENCY_S="0.2") for _ in range(3)]
    billers = [spawn_billing() for _ in range(2)]
    n = 300
    async with Client(settings.nats_url) as client:
        for i in range(n):
            await client.provision(
                ProvisionRequest(request_id=f"s{i}", tenant="acme", profile="profile.burst-sandbox")
            )
        ids = [sandbox_id_for("acme", f"s{i}") for i in range(n)]

        async def all_in(state: SandboxState) -> bool:
            found = {s.sandbox_id: s.state for s in await client.statuses()}
            return all(found.get(i) is state for i in ids)

        await wait_until(lambda: all_in(SandboxState.READY))
        # Exactly one delivery per request: no process handled one another was on.
        assert await deliveries(js, "provisioner-provision") == n
        assert len(await stub_sandboxes(js)) == n

        # A worker and a billing process are stopped with SIGTERM while destroys run.
        for i in range(n):
            await client.destroy(
                DestroyRequest(request_id=f"d{i}", tenant="acme", sandbox_id=ids[i])
            )
        workers[0].send_signal(signal.SIGTERM)
        billers[0].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(workers[0].wait, 60) == 0  # drained, clean exit
        assert await asyncio.to_thread(billers[0].wait, 60) == 0
        await wait_until(lambda: all_in(SandboxState.DESTROYED))

        async def all_billed() -> bool:
            usage = await stream_messages(js, "BILLING", "billing.usage")
            return len(usage) >= n

        await wait_until(all_billed)
    debits = [e for e in await Ledger(js).entries("acme") if e.kind == "debit"]
    assert len(debits) == n and len({e.sandbox_id for e in debits}) == n
    usage = await stream_messages(js, "BILLING", "billing.usage")
    assert len(usage) == n
    assert sum((e.amount_usd for e in debits), Decimal(0)) == sum(
        (Decimal(u["actual_usd"]) for _, u in usage), Decimal(0)
    )
