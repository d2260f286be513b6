"""Small observers used by the tests: they read what the service wrote, nothing more."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from adapters.registry import Registry
from consumers.reconcile import Finding
from consumers.replay import Range, Summary, replay
from consumers.wiring import open_worker
from sandboxer.client import Client
from sandboxer.dev.servers import EmbeddedNats, free_port
from sandboxer.settings import Settings, default_extensions_dir
from sandboxer.statuses import StatusStore
from sandboxer.topology import ensure_topology, kv_entries, read_subject
from schemas import DestroyRequest, ProvisionRequest, SandboxState, SandboxStatus

#: The stub's manifest rate, which made-up stopped sandboxes ran at.
STUB_RATE = Decimal("0.000010")


def stopped_event(n: int, **changes: object) -> dict[str, object]:
    """The `stopped` meter event of a made-up stub sandboxes number `n` that ran a
    minute at 0.00001 USD/s; `changes` replace fields."""
    sandbox_id = f"sbx-{n:024x}"
    return {
        "event_id": f"{sandbox_id}.stopped",
        "kind": "stopped",
        "extension_id": "ext.saas-stub",
        "sandbox_id": sandbox_id,
        "tenant": "acme",
        "profile": "profile.burst-sandbox",
        "provider_sandbox_id": f"stub-{n}",
        "started_at": "2026-01-01T00:00:00+00:00",
        "stopped_at": "2026-01-01T00:01:00+00:00",
        "duration_s": "60.000",
        "estimate_usd": "0.009000",
        "actual_usd": "0.000600",
        "usd_per_second": "0.000010",
        **changes,
    }


async def replay_all(js: JetStreamContext, subject: str, span: Range, **options: Any) -> Summary:
    """`sandboxer replay` of the shipped extensions' deployment."""
    registry = Registry.load(default_extensions_dir())
    return await replay(js, subject, span, registry=registry, **options)


async def stopped_sandbox(
    js: JetStreamContext, n: int, tenant: str = "acme", usd: str = "0.000600"
) -> bytes:
    """A made-up stub sandbox that ran long enough to cost `usd`, as a worker leaves it:
    its `destroyed` status stored, and its `stopped` meter event (returned, to publish)."""
    duration = Decimal(usd) / STUB_RATE
    started = datetime(2026, 1, 1, tzinfo=UTC)
    stopped = started + timedelta(seconds=float(duration))
    status = SandboxStatus(
        sandbox_id=f"sbx-{n:024x}",
        request_id=f"r{n}",
        tenant=tenant,
        profile="profile.burst-sandbox",
        extension_id="ext.saas-stub",
        provider_sandbox_id=f"stub-{n}",
        state=SandboxState.DESTROYED,
        created_at=started,
        ready_at=started,
        started_at=started,
        expires_at=started + timedelta(hours=1),
        destroyed_at=stopped,
        meter_fields={"usd_per_second": str(STUB_RATE)},
        estimate_usd=Decimal("0.036000"),
        actual_usd=Decimal(usd),
    )
    await (await StatusStore.open(js)).create(status)
    event = stopped_event(
        n,
        tenant=tenant,
        actual_usd=usd,
        duration_s=f"{duration:.3f}",
        stopped_at=stopped.isoformat(),
        estimate_usd="0.036000",
    )
    return json.dumps(event).encode()


def as_started(settings: Settings) -> Settings:
    """`settings` as a process started now has them: the test's own, plus what the
    environment says of OpenBao, the adapters' config and fin-hub's token (tests set
    those with `monkeypatch.setenv`, as an operator sets variables)."""
    env = Settings.from_env()
    return replace(
        settings,
        bao=env.bao,
        adapter_env=env.adapter_env,
        fault_inject=env.fault_inject,
        fin_hub_token=env.fin_hub_token or settings.fin_hub_token,
    )


#: Figures of the chaos suite (tests/test_chaos.py), printed by tests/conftest.py:
#: (name, value, detail).
FIGURES: list[tuple[str, int, str]] = []


async def stream_messages(
    js: JetStreamContext, stream: str, subject: str = ">"
) -> list[tuple[str, dict[str, Any]]]:
    """Every message of `stream` on `subject`, as (subject, decoded JSON)."""
    return [(subj, json.loads(data)) async for _, subj, data in read_subject(js, stream, subject)]


async def meter_events(js: JetStreamContext, sandbox_id: str | None = None) -> list[dict[str, Any]]:
    events = [body for _, body in await stream_messages(js, "SANDBOX_METER")]
    return [e for e in events if sandbox_id is None or e["sandbox_id"] == sandbox_id]


async def wait_for_status(
    client: Client,
    sandbox_id: str,
    predicate: Callable[[SandboxStatus], bool] = lambda s: s.state.settled,
    timeout_s: float = 15.0,
) -> SandboxStatus:
    """Poll the stored status until `predicate` holds."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    last: SandboxStatus | None = None
    while asyncio.get_running_loop().time() < deadline:
        last = await client.status(sandbox_id)
        if last is not None and predicate(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"status of {sandbox_id} never matched; last seen: {last}")


async def wait_for_state(
    client: Client, sandbox_id: str, state: SandboxState, timeout_s: float = 15.0
) -> SandboxStatus:
    return await wait_for_status(client, sandbox_id, lambda s: s.state is state, timeout_s)


async def consumer_backlog(
    js: JetStreamContext, durable: str, stream: str = "SANDBOX_REQUESTS"
) -> tuple[int, int]:
    """(messages not yet delivered, delivered but not acked) of a durable consumer."""
    info = await js.consumer_info(stream, durable)
    return info.num_pending or 0, info.num_ack_pending or 0


async def wait_until_drained(
    js: JetStreamContext, durable: str, timeout_s: float = 15.0, stream: str = "SANDBOX_REQUESTS"
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await consumer_backlog(js, durable, stream) == (0, 0):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{durable} still has {await consumer_backlog(js, durable, stream)}")


async def deliveries(js: JetStreamContext, durable: str) -> int:
    """How many times the consumer has delivered anything, redeliveries included."""
    info = await js.consumer_info("SANDBOX_REQUESTS", durable)
    return info.delivered.consumer_seq or 0


async def stub_sandboxes(js: JetStreamContext) -> list[dict[str, Any]]:
    """Every sandbox the stub cloud ever made (running or not), as stored."""
    return [json.loads(value) async for _, value in kv_entries(js, "sandboxer-stub", "sbx.>")]


async def provision(
    client: Client, tenant: str, profile: str, *, wait_s: float = 30, **fields: Any
) -> SandboxStatus:
    """Ask for a sandbox under a new request id; its settled status."""
    request = ProvisionRequest(
        request_id=uuid.uuid4().hex, tenant=tenant, profile=profile, **fields
    )
    status = await client.provision(request, wait_s=wait_s)
    assert status is not None, "no answer"
    return status


async def destroy(client: Client, status: SandboxStatus, *, wait_s: float = 30) -> SandboxStatus:
    """Destroy a sandbox under a new request id; its `destroyed` status."""
    request = DestroyRequest(
        request_id=uuid.uuid4().hex, tenant=status.tenant, sandbox_id=status.sandbox_id
    )
    done = await client.destroy(request, wait_s=wait_s)
    assert done is not None and done.state is SandboxState.DESTROYED, done
    return done


async def sandboxer(settings: Settings, *args: str, **env: str) -> tuple[int, str, str]:
    """Run the `sandboxer` command against the test's NATS, with `env` set too:
    (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandboxer",
        *args,
        env={**os.environ, "SANDBOXER_NATS_URL": settings.nats_url, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def reconcile(settings: Settings, js: JetStreamContext, **kwargs: Any) -> list[Finding]:
    """One reconciliation pass (no grace), as `sandboxer reconcile` runs it."""
    async with AsyncExitStack() as stack:
        parts = await open_worker(as_started(settings), js, stack)
        return await parts.reconciler(grace_s=0).run(**kwargs)


async def provision_by_cli(settings: Settings, tenant: str, profile: str) -> SandboxStatus:
    """`sandboxer provision --tenant T --profile P --wait --json`: it must exit 0."""
    code, out, err = await sandboxer(
        settings, "provision", "--tenant", tenant, "--profile", profile, "--wait", "--json"
    )
    assert code == 0, err
    return SandboxStatus.model_validate_json(out.splitlines()[-1])


class Cluster:
    """Three nats-servers on loopback, routed to each other, with JetStream."""

    def __init__(self, root: Path) -> None:
        cluster_ports = [free_port() for _ in range(3)]
        self.nodes = [
            EmbeddedNats(
                root / f"n{i}",
                server_name=f"n{i}",
                cluster_port=cluster_ports[i],
                routes=[p for j, p in enumerate(cluster_ports) if j != i],
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def __enter__(self) -> Cluster:
        for node in self.nodes:
            node.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for node in self.nodes:
            node.stop()


async def until_topology(url: str, replicas: int, timeout_s: float = 60) -> None:
    """Create the streams and buckets once the cluster has a JetStream leader."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            async with Client(url, reconnect=True) as client:
                await ensure_topology(client.js, replicas=replicas)
                return
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
