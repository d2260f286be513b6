"""Bad input gets a clear answer, is never redelivered forever, and never stops a worker."""

from __future__ import annotations

import json

import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from schemas import ErrorCode, ProvisionRequest, SandboxState
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
