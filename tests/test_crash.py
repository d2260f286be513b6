"""A worker SIGKILLed mid-provision loses nothing and makes no second sandbox."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import Callable

from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ProvisionRequest, SandboxState
from tests.helpers import meter_events, stub_sandboxes, wait_for_state

Spawn = Callable[..., subprocess.Popen[bytes]]


async def wait_for_consumers(client: Client) -> None:
    for _ in range(200):
        try:
            names = {c.name for c in await client.js.consumers_info("SANDBOX_REQUESTS")}
        except Exception:
            names = set()
        if {"provisioner-provision", "provisioner-destroy"} <= names:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("worker did not start")


async def test_sigkilled_worker_mid_provision_completes_after_restart(
    spawn_worker: Spawn, settings: Settings, js: JetStreamContext
) -> None:
    first = spawn_worker(SANDBOXER_STUB_LATENCY_S="30")
    ids = [sandbox_id_for("acme", f"crash-{i}") for i in range(20)]
    async with Client(settings.nats_url) as client:
        await wait_for_consumers(client)
        for i in range(20):
            await client.provision(
                ProvisionRequest(
                    request_id=f"crash-{i}", tenant="acme", profile="profile.burst-sandbox"
                )
            )
        # Every request is claimed and its provider call is under way...
        for sandbox_id in ids:
            await wait_for_state(client, sandbox_id, SandboxState.PROVISIONING)
        first.send_signal(signal.SIGKILL)
        first.wait()

        spawn_worker(SANDBOXER_STUB_LATENCY_S="0")
        for sandbox_id in ids:
            await wait_for_state(client, sandbox_id, SandboxState.READY, timeout_s=30)

    assert len(await stub_sandboxes(js)) == 20
    started = [e for e in await meter_events(js) if e["kind"] == "started"]
    assert sorted(e["sandbox_id"] for e in started) == sorted(ids)


async def test_sigterm_drains_in_flight_provisions(
    spawn_worker: Spawn, settings: Settings, js: JetStreamContext
) -> None:
    worker = spawn_worker(SANDBOXER_STUB_LATENCY_S="2")
    async with Client(settings.nats_url) as client:
        await wait_for_consumers(client)
        request = ProvisionRequest(
            request_id="drain", tenant="acme", profile="profile.burst-sandbox"
        )
        await client.provision(request)
        sandbox_id = sandbox_id_for("acme", "drain")
        await wait_for_state(client, sandbox_id, SandboxState.PROVISIONING)
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 30) == 0
        # The in-flight request finished before the worker exited.
        status = await client.status(sandbox_id)
        assert status is not None and status.state is SandboxState.READY
