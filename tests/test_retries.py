"""Transient provider failures are retried with backoff, up to the delivery limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import Start, WorkerHandle
from tests.helpers import (
    deliveries,
    meter_events,
    stream_messages,
    stub_sandboxes,
    wait_for_state,
    wait_until_drained,
)

StubWorker = Callable[..., Awaitable[object]]


def request(request_id: str) -> ProvisionRequest:
    return ProvisionRequest(request_id=request_id, tenant="acme", profile="profile.burst-sandbox")


@pytest.fixture
def stub_worker(
    start_worker: Start, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Awaitable[WorkerHandle]]:
    """Start a worker whose stub behaves as `SANDBOXER_STUB_<NAME>=value` say."""

    async def start(worker_settings: dict[str, Any] | None = None, **stub: str) -> WorkerHandle:
        for name, value in stub.items():
            monkeypatch.setenv(f"SANDBOXER_STUB_{name.upper()}", value)
        return await start_worker(**(worker_settings or {}))

    return start


async def test_transient_failures_are_retried_until_ready(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    await stub_worker(fail_first="2")
    async with Client(settings.nats_url) as client:
        ready = await client.provision(request("flaky"), wait_s=20)
    assert ready is not None and ready.state is SandboxState.READY
    stub = await js.key_value("sandboxer-stub")
    attempts = await stub.get(f"attempts.{ready.sandbox_id}")
    assert attempts.value == b"3"  # two injected failures, then success
    assert len(await meter_events(js, ready.sandbox_id)) == 1


async def test_persistent_failure_gives_up_with_provider_unavailable(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    await stub_worker(failure_rate="1")
    async with Client(settings.nats_url) as client:
        failed = await client.provision(request("down"), wait_s=20)
    assert failed is not None and failed.state is SandboxState.FAILED
    assert failed.error is not None and failed.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    await wait_until_drained(js, "provisioner-provision")  # terminated, not redelivered


async def test_rejection_fails_at_once(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    await stub_worker(reject_rate="1")
    async with Client(settings.nats_url) as client:
        failed = await client.provision(request("refused"), wait_s=20)
    assert failed is not None and failed.error is not None
    assert failed.error.code is ErrorCode.PROVIDER_REJECTED
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again
    # Its TTL schedule, placed beside the hold before the provider was called, is gone:
    # nothing will try to destroy it at expiry.
    assert (
        await stream_messages(js, "SANDBOX_REQUESTS", f"sandbox.schedule.{failed.sandbox_id}") == []
    )


async def test_lost_create_response_is_retried_without_a_second_sandbox(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    # Every create succeeds at the provider but the first answer is lost half the time.
    await stub_worker({"max_deliver": 20}, lost_response_rate="0.5")
    async with Client(settings.nats_url) as client:
        for i in range(10):
            await client.provision(request(f"lossy-{i}"))
        for i in range(10):
            await wait_for_state(client, sandbox_id_for("acme", f"lossy-{i}"), SandboxState.READY)
    assert len(await stub_sandboxes(js)) == 10


async def test_slow_provider_calls_run_concurrently(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    await stub_worker(latency_s="1")
    async with Client(settings.nats_url) as client:
        began = time.monotonic()
        for i in range(100):
            await client.provision(request(f"slow-{i}"))
        await asyncio.gather(
            *(
                wait_for_state(client, sandbox_id_for("acme", f"slow-{i}"), SandboxState.READY, 30)
                for i in range(100)
            )
        )
        elapsed = time.monotonic() - began
    # One at a time this takes 100 s; concurrently, about one latency.
    assert elapsed < 15, f"100 provisions with 1 s latency took {elapsed:.1f}s"


async def test_long_provider_call_is_not_redelivered(
    stub_worker: StubWorker, settings: Settings, js: JetStreamContext
) -> None:
    # The create takes three ack-wait periods; in_progress keeps the message ours.
    await stub_worker(latency_s=str(settings.ack_wait_s * 3))
    async with Client(settings.nats_url) as client:
        ready = await client.provision(request("slow"), wait_s=30)
    assert ready is not None and ready.state is SandboxState.READY
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again
