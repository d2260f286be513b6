"""Dead letters: what a consumer gives up on is kept with why and its original headers,
and an operator can list, show, retry (with a fixed body) or drop it."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from typer.testing import CliRunner

from consumers.deadletter import DeadLetter, list_dead_letters, retry_dead_letter
from sandboxer.cli import app
from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import Start
from tests.helpers import wait_for_state, wait_until_drained

runner = CliRunner()


async def dead_letters(js: JetStreamContext, count: int, timeout_s: float = 15) -> list[DeadLetter]:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        found = await list_dead_letters(js)
        if len(found) >= count or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.1)


async def test_garbage_is_kept_with_its_headers_and_a_fixed_body_goes_through(
    client: Client, js: JetStreamContext
) -> None:
    body = b'{"tenant": "acme", "profile": "profile.burst-sandbox"}'  # no request_id
    await js.publish("sandbox.provision", body, headers={"X-Trace": "t-42"})
    [letter] = await dead_letters(js, 1)
    assert letter.origin.consumer == "provisioner-provision"
    assert letter.origin.subject == "sandbox.provision" and letter.origin.deliveries == 1
    assert letter.reason.startswith("invalid ProvisionRequest: request_id: Field required")
    assert letter.data == body and letter.original_headers == {"X-Trace": "t-42"}
    await wait_until_drained(js, "provisioner-provision")  # terminated, not redelivered

    fixed = json.dumps({**json.loads(body), "request_id": "fixed-1"}).encode()
    await retry_dead_letter(js, letter, fixed)
    ready = await wait_for_state(client, sandbox_id_for("acme", "fixed-1"), SandboxState.READY)
    assert ready.request_id == "fixed-1"
    assert await list_dead_letters(js) == []  # retried letters are dropped


async def test_an_invalid_request_can_be_fixed_under_its_own_request_id(
    client: Client, js: JetStreamContext
) -> None:
    bad = {
        "request_id": "too-long",
        "tenant": "acme",
        "profile": "profile.burst-sandbox",
        "ttl_s": 10**6,
    }
    await js.publish("sandbox.provision", json.dumps(bad).encode())
    sandbox_id = sandbox_id_for("acme", "too-long")
    failed = await wait_for_state(client, sandbox_id, SandboxState.FAILED)
    assert failed.error is not None and failed.error.code is ErrorCode.INVALID_REQUEST
    [letter] = await dead_letters(js, 1)

    # A plain redelivery (a replay) gets the stored answer; an operator's retry of the
    # fixed request reopens the claim, which never held credits or made a sandbox.
    await js.publish("sandbox.provision", json.dumps({**bad, "ttl_s": 60}).encode())
    await asyncio.sleep(0.5)
    answer = await client.status(sandbox_id)
    assert answer is not None and answer.state is SandboxState.FAILED
    await retry_dead_letter(js, letter, json.dumps({**bad, "ttl_s": 60}).encode())
    ready = await wait_for_state(client, sandbox_id, SandboxState.READY)
    assert ready.error is None and ready.extension_id == "ext.saas-stub"


async def test_out_of_deliveries_is_kept_and_answered(
    start_worker: Start,
    settings: Settings,
    js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOXER_STUB_FAILURE_RATE", "1")
    await start_worker()
    async with Client(settings.nats_url) as client:
        request = ProvisionRequest(
            request_id="down", tenant="acme", profile="profile.burst-sandbox"
        )
        failed = await client.provision(request, wait_s=20)
    assert failed is not None and failed.error is not None
    assert failed.error.code is ErrorCode.PROVIDER_UNAVAILABLE
    [letter] = await dead_letters(js, 1)
    assert letter.origin.deliveries == settings.max_deliver
    assert f"after {settings.max_deliver} deliveries" in letter.reason
    assert "ProviderUnavailable" in letter.reason


async def test_rejection_is_an_answer_not_a_dead_letter(
    client: Client, js: JetStreamContext
) -> None:
    request = {"request_id": "nope", "tenant": "acme", "profile": "profile.nope"}
    await js.publish("sandbox.provision", json.dumps(request).encode())
    failed = await wait_for_state(client, sandbox_id_for("acme", "nope"), SandboxState.FAILED)
    assert failed.error is not None and failed.error.code is ErrorCode.UNKNOWN_PROFILE
    await wait_until_drained(js, "provisioner-provision")
    assert await list_dead_letters(js) == []


async def test_server_max_deliveries_become_dead_letters(worker: Any, js: JetStreamContext) -> None:
    """A consumer that never answers (its worker dies on every delivery) reaches
    max_deliver; the server's advisory is turned into a dead letter."""
    await js.add_consumer(
        "SANDBOX_REQUESTS",
        ConsumerConfig(
            durable_name="crashy",
            filter_subject="sandbox.destroy",
            ack_wait=0.3,
            max_deliver=2,
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    sub = await js.pull_subscribe_bind("crashy", stream="SANDBOX_REQUESTS")
    payload = json.dumps({"request_id": "d1", "tenant": "acme", "sandbox_id": "sbx-" + "0" * 24})
    ack = await js.publish("sandbox.destroy", payload.encode(), headers={"X-Trace": "t-7"})
    for _ in range(2):
        await sub.fetch(1, timeout=5)  # delivered, never acked
    with pytest.raises(nats.errors.TimeoutError):
        await sub.fetch(1, timeout=1)  # the server gives up instead of a third delivery
    letters = [d for d in await dead_letters(js, 1) if d.origin.consumer == "crashy"]
    assert len(letters) == 1
    assert (letters[0].origin.seq, letters[0].origin.deliveries) == (ack.seq, 2)
    assert "delivered 2 times without an answer" in letters[0].reason
    assert letters[0].original_headers == {"X-Trace": "t-7"}


async def test_cli_lists_shows_retries_and_drops(
    client: Client,
    js: JetStreamContext,
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("SANDBOXER_NATS_URL", settings.nats_url)
    for garbage in (b'{"tenant": "acme"}', b"not json at all"):
        await js.publish("sandbox.provision", garbage)
    first, second = await dead_letters(js, 2)

    listed = await asyncio.to_thread(runner.invoke, app, ["dlq", "ls", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["id"] for line in listed.output.splitlines()] == [first.id, second.id]
    shown = await asyncio.to_thread(runner.invoke, app, ["dlq", "show", str(second.id)])
    assert shown.exit_code == 0 and "not json at all" in shown.output

    fixed = tmp_path / "fixed.json"
    fixed.write_text(
        '{"tenant": "acme", "profile": "profile.burst-sandbox", "request_id": "cli-fixed"}'
    )
    retried = await asyncio.to_thread(
        runner.invoke, app, ["dlq", "retry", str(first.id), "--body", str(fixed), "--json"]
    )
    assert retried.exit_code == 0, retried.output
    said = json.loads(retried.output)
    assert (said["id"], said["subject"], said["dropped"]) == (first.id, "sandbox.provision", True)
    await wait_for_state(client, sandbox_id_for("acme", "cli-fixed"), SandboxState.READY)

    caplog.set_level(logging.WARNING)
    dropped = await asyncio.to_thread(runner.invoke, app, ["dlq", "drop", str(second.id), "--json"])
    assert dropped.exit_code == 0 and json.loads(dropped.output) == {
        "id": second.id,
        "dropped": True,
    }
    assert f"dead letter {second.id}" in caplog.text and "dropped" in caplog.text
    assert await list_dead_letters(js) == []
    missing = await asyncio.to_thread(runner.invoke, app, ["dlq", "show", str(second.id)])
    assert missing.exit_code == 1 and "no dead letter" in missing.output
