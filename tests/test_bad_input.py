"""Bad input gets a clear answer, is never redelivered forever, and never stops a worker."""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from nats.js import JetStreamContext
from nats.js.errors import APIError

from consumers.deadletter import list_dead_letters
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.servers import EmbeddedNats
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import WorkerHandle
from tests.helpers import deliveries, wait_for_state, wait_until_drained

GOOD = {"request_id": "ok", "tenant": "acme", "profile": "profile.burst-sandbox"}


async def assert_worker_still_serves(client: Client) -> None:
    answer = await client.provision(ProvisionRequest.model_validate(GOOD), wait_s=15)
    assert answer is not None and answer.state is SandboxState.READY


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b"",
        b"[]",
        b"\xff\xfe\x00",
        json.dumps({"tenant": "acme"}).encode(),
    ],
    ids=["broken-json", "empty", "array", "binary", "no-request-id"],
)
async def test_unattributable_garbage_is_dropped_not_redelivered(
    client: Client, js: JetStreamContext, payload: bytes
) -> None:
    await js.publish("sandbox.provision", payload)
    await wait_until_drained(js, "provisioner-provision")
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again
    await assert_worker_still_serves(client)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({**GOOD, "request_id": "r-ttl", "ttl_s": 999999}, ErrorCode.INVALID_REQUEST),
        ({**GOOD, "request_id": "r-ttl-range", "ttl_s": 1}, ErrorCode.INVALID_REQUEST),
        ({**GOOD, "request_id": "r-extra", "color": "red"}, ErrorCode.INVALID_REQUEST),
        (
            {**GOOD, "request_id": "r-meta", "metadata": {f"k{i}": "v" for i in range(50)}},
            ErrorCode.INVALID_REQUEST,
        ),
        ({**GOOD, "request_id": "r-profile", "profile": "profile.nope"}, ErrorCode.UNKNOWN_PROFILE),
        ({**GOOD, "request_id": "r-version", "schema_version": 2}, ErrorCode.INVALID_REQUEST),
    ],
    ids=[
        "ttl-too-long",
        "ttl-below-min",
        "unknown-field",
        "too-much-metadata",
        "unknown-profile",
        "future-schema",
    ],
)
async def test_attributable_bad_request_gets_failed_status(
    client: Client, js: JetStreamContext, body: dict[str, object], code: ErrorCode
) -> None:
    await js.publish("sandbox.provision", json.dumps(body).encode())
    sandbox_id = sandbox_id_for("acme", str(body["request_id"]))
    failed = await wait_for_state(client, sandbox_id, SandboxState.FAILED)
    assert failed.error is not None and failed.error.code is code
    assert failed.error.message
    await wait_until_drained(js, "provisioner-provision")
    assert await deliveries(js, "provisioner-provision") == 1  # delivered once, never again
    await assert_worker_still_serves(client)


async def test_invalid_destroy_is_dropped(client: Client, js: JetStreamContext) -> None:
    await js.publish("sandbox.destroy", b'{"tenant": "acme", "sandbox_id": "../../etc"}')
    await wait_until_drained(js, "provisioner-destroy")
    assert await deliveries(js, "provisioner-destroy") == 1
    await assert_worker_still_serves(client)


@pytest.mark.parametrize(
    "payload",
    [
        b"[" * 60_000,
        b'{"tenant": "acme", "request_id": "deep", "metadata": ' + b"[" * 60_000,
        b'{"tenant": "acme", "request_id": "deep2", "x": ' + b'{"a": ' * 10_000 + b"1",
    ],
    ids=["brackets", "attributable-then-deep", "objects"],
)
async def test_deep_nesting_is_one_dead_letter_not_a_crash_loop(
    client: Client, js: JetStreamContext, payload: bytes
) -> None:
    await js.publish("sandbox.provision", payload)
    await wait_until_drained(js, "provisioner-provision")
    assert await deliveries(js, "provisioner-provision") == 1
    [letter] = await list_dead_letters(js)
    assert "invalid ProvisionRequest" in letter.reason and "recursion" in letter.reason
    await assert_worker_still_serves(client)


async def test_an_input_over_the_streams_limit_is_refused_at_the_door(
    client: Client, js: JetStreamContext
) -> None:
    huge = json.dumps({**GOOD, "reason": "x" * (1024 * 1024 - 2048)}).encode()
    with pytest.raises(APIError, match="maximum"):  # the stream's max_msg_size
        await js.publish("sandbox.destroy", huge)
    with pytest.raises(APIError, match="maximum"):  # 100,000 nested brackets: 100 KB
        await js.publish("sandbox.provision", b"[" * 100_000)
    assert await deliveries(js, "provisioner-destroy") == 0
    await assert_worker_still_serves(client)


async def test_a_dead_letter_too_big_for_the_server_is_cut_and_the_worker_lives(
    tmp_path: Path, settings: Settings
) -> None:
    """A message just under the server's `max_payload` used to come back as a dead
    letter over it, which closed the connection and disabled the worker for good."""
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 66000\n")  # room for a 64 KiB request, not its letter
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        small = replace(settings, nats_url=server.url)
        worker = WorkerHandle(small)
        await worker.start()
        try:
            async with Client(server.url) as client:
                await Ledger(client.js).grant("acme", Decimal("10"), "funds")
                invalid = {"request_id": "big", "tenant": "acme", "reason": "x" * 65_000}
                body = json.dumps({**invalid, "sandbox_id": "sbx-" + "0" * 24}).encode()
                await client.js.publish("sandbox.destroy", body)
                for _ in range(200):
                    letters = await list_dead_letters(client.js)
                    if letters:
                        break
                    await asyncio.sleep(0.05)
                [letter] = letters
                assert letter.headers["Sandboxer-Dlq-Truncated"] == str(len(body))
                assert letter.headers["Sandboxer-Dlq-Sha256"] == hashlib.sha256(body).hexdigest()
                assert body.startswith(letter.data) and len(letter.data) < len(body)
                await assert_worker_still_serves(client)
            assert not worker.crashed
        finally:
            await worker.stop()
