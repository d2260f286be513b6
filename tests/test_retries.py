"""Transient provider failures are retried with backoff, up to the delivery limit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.helpers import deliveries, meter_events, wait_for_state, wait_until_drained


def request(request_id: str) -> ProvisionRequest:
    return ProvisionRequest(request_id=request_id, tenant="acme", profile="profile.burst-sandbox")


async def test_transient_failures_are_retried_until_ready(
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SANDBOXER_STUB_FAIL_FIRST", "2")
    await start_worker()  # type: ignore[misc]
    async with Client(settings.nats_url) as client:
        ready = await client.provision(request("flaky"), wait_s=20)
    assert ready is not None and ready.state is SandboxState.READY
    stub = await js.key_value("sandboxer-stub")
    attempts = await stub.get(f"attempts.{ready.sandbox_id}")
    assert attempts.value == b"3"  # two injected failures, then success
    assert len(await meter_events(js, ready.sandbox_id)) == 1


async def test_persistent_failure_gives_up_with_provider_unavailable(
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SANDBOXER_STUB_FAILURE_RATE", "1")
    await start_worker()  # type: ignore[misc]
    async with Client(settings.nats_url) as client:
        failed = await client.provision(request("down"), wait_s=20)
    assert failed is not None and failed.state is SandboxState.FAILED
    assert failed.error is not None and failed.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    await wait_until_drained(js, "provisioner-provision")  # terminated, not redelivered


async def test_rejection_fails_at_once(
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SANDBOXER_STUB_REJECT_RATE", "1")
    await start_worker()  # type: ignore[misc]
    async with Client(settings.nats_url) as client:
        failed = await client.provision(request("refused"), wait_s=20)
    assert failed is not None and failed.error is not None
    assert failed.error.code is ErrorCode.PROVIDER_REJECTED
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again


async def test_lost_create_response_is_retried_without_a_second_sandbox(
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # Every create succeeds at the provider but the first answer is lost half the time.
    monkeypatch.setenv("SANDBOXER_STUB_LOST_RESPONSE_RATE", "0.5")
    monkeypatch.setenv("SANDBOXER_MAX_DELIVER", "20")
    await start_worker(max_deliver=20)  # type: ignore[misc]
    async with Client(settings.nats_url) as client:
        for i in range(10):
            await client.provision(request(f"lossy-{i}"))
        for i in range(10):
            await wait_for_state(client, sandbox_id_for("acme", f"lossy-{i}"), SandboxState.READY)
    stub = await js.key_value("sandboxer-stub")
    assert len([k for k in await stub.keys() if k.startswith("sbx.")]) == 10


async def test_slow_provider_calls_run_concurrently(
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("SANDBOXER_STUB_LATENCY_S", "1")
    await start_worker()  # type: ignore[misc]
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
    start_worker: Callable[..., object], settings: Settings, js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # The create takes three ack-wait periods; in_progress keeps the message ours.
    monkeypatch.setenv("SANDBOXER_STUB_LATENCY_S", str(settings.ack_wait_s * 3))
    await start_worker()  # type: ignore[misc]
    async with Client(settings.nats_url) as client:
        ready = await client.provision(request("slow"), wait_s=30)
    assert ready is not None and ready.state is SandboxState.READY
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again
