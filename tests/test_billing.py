"""Billing: one debit and one usage record per sandbox, and a fin-hub export that never
loses or doubles a record, over real NATS and a real HTTP server."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from consumers.deadletter import list_dead_letters
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from schemas import DestroyRequest, ProvisionRequest, SandboxState, UsageRecord
from tests.fake_finhub import FakeFinHub, Script
from tests.helpers import sandboxer, stopped_sandbox, stream_messages

Start = Callable[..., Any]


async def until(check: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def usage_records(js: JetStreamContext) -> list[dict[str, Any]]:
    return [body for _, body in await stream_messages(js, "BILLING", "billing.usage")]


async def debits(js: JetStreamContext, tenant: str = "acme") -> list[Decimal]:
    return [e.amount_usd for e in await Ledger(js).entries(tenant) if e.kind == "debit"]


@pytest.fixture
def fin_hub() -> Iterator[FakeFinHub]:
    with FakeFinHub() as hub:
        yield hub


async def test_stopped_event_delivered_five_times_and_replayed_bills_once(
    start_billing: Start, js: JetStreamContext, fin_hub: FakeFinHub
) -> None:
    billing = await start_billing(fin_hub_url=fin_hub.url)
    for _ in range(5):  # five copies on the stream: no Nats-Msg-Id to hide behind
        await js.publish(
            "sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 1, usd="0.000123")
        )

    async def exported() -> bool:
        return len(fin_hub.accepted) == 1

    await until(exported)
    # A replay from the stream start by a fresh consumer, after a restart.
    await billing.stop()
    await js.delete_consumer("SANDBOX_METER", "billing-meter")
    await js.delete_consumer("BILLING", "finhub-export")
    await start_billing(fin_hub_url=fin_hub.url)
    await asyncio.sleep(1.0)
    await until(lambda: _drained(js, "SANDBOX_METER", "billing-meter"))
    await until(lambda: _drained(js, "BILLING", "finhub-export"))

    assert await debits(js) == [Decimal("0.000123")]
    assert len(await usage_records(js)) == 1
    assert fin_hub.posts == 1  # not one accepted among duplicates: one POST, period
    record = fin_hub.accepted[f"usage-sbx-{1:024x}"]
    assert record["actual_usd"] == "0.000123" and record["tenant"] == "acme"


async def _drained(js: JetStreamContext, stream: str, durable: str) -> bool:
    info = await js.consumer_info(stream, durable)
    return (info.num_pending or 0) == 0 and (info.num_ack_pending or 0) == 0


async def test_fin_hub_outage_and_hang_lose_nothing_and_ack_nothing_early(
    start_billing: Start, js: JetStreamContext
) -> None:
    with FakeFinHub(Script(fail=4, hang=2, hang_s=3.0)) as hub:
        await start_billing(fin_hub_url=hub.url, fin_hub_timeout_s=0.5)
        for n in range(3):
            await js.publish(
                "sandbox.meter.ext.saas-stub", await stopped_sandbox(js, n, usd=f"0.00010{n}")
            )

        async def failing_phase_over() -> bool:
            return hub.script.fail == 0 and hub.script.hang == 0

        await until(failing_phase_over)
        if not hub.accepted:  # nothing arrived yet, so nothing may have been acked
            info = await js.consumer_info("BILLING", "finhub-export")
            assert info.ack_floor.consumer_seq == 0

        async def all_arrived() -> bool:
            return len(hub.accepted) == 3

        await until(all_arrived, timeout_s=30)
        await until(lambda: _drained(js, "BILLING", "finhub-export"))
        assert set(hub.accepted_count.values()) == {1}  # exactly once per record_id
        assert hub.posts >= 3 + 4 + 2
        assert hub.total_usd() == sum(await debits(js), Decimal(0)) == Decimal("0.000303")


async def test_a_fin_hub_slower_than_the_ack_wait_gets_each_record_once(
    start_billing: Start, js: JetStreamContext, settings: Settings
) -> None:
    """A POST that outlasts the ack wait keeps its delivery: it used not to, and the
    redelivery, handled meanwhile, POSTed the record a second time."""
    slow_s = settings.ack_wait_s * 1.5  # under the fin-hub timeout
    with FakeFinHub(Script(slow_s=slow_s)) as hub:
        await start_billing(fin_hub_url=hub.url, fin_hub_timeout_s=slow_s * 2)
        await js.publish("sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 7))

        async def exported() -> bool:
            return bool(hub.accepted)

        await until(exported, timeout_s=30)
        await until(lambda: _drained(js, "BILLING", "finhub-export"), timeout_s=30)
        assert hub.posts == 1 and list(hub.accepted_count.values()) == [1]


async def test_rejected_record_goes_to_the_dead_letter_subject(
    start_billing: Start, js: JetStreamContext
) -> None:
    rejected = f"usage-sbx-{7:024x}"
    with FakeFinHub(Script(reject={rejected})) as hub:
        await start_billing(fin_hub_url=hub.url)
        await js.publish(
            "sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 7, usd="0.000123")
        )
        await js.publish(
            "sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 8, usd="0.000123")
        )

        async def settled() -> bool:
            return len(hub.accepted) == 1 and await _drained(js, "BILLING", "finhub-export")

        await until(settled)
        [dead] = await list_dead_letters(js)
        assert dead.origin.consumer == "finhub-export" and dead.origin.subject == "billing.usage"
        assert "HTTP 422" in dead.reason and rejected in dead.reason
        assert json.loads(dead.data)["record_id"] == rejected  # the record itself, unchanged
        assert hub.posts == 2  # the rejected one was not retried


async def test_export_disabled_keeps_records_on_the_stream(
    start_billing: Start, js: JetStreamContext
) -> None:
    await start_billing(fin_hub_url=None)
    await js.publish("sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 3, usd="0.000123"))

    async def recorded() -> bool:
        return len(await usage_records(js)) == 1

    await until(recorded)
    assert "finhub-export" not in {c.name for c in await js.consumers_info("BILLING")}


async def test_billing_killed_between_debit_and_usage_record(
    settings: Settings, js: JetStreamContext, spawn_billing: Callable[..., Any]
) -> None:
    crashing = spawn_billing(SANDBOXER_FAULT_INJECT="kill-after-debit")
    await asyncio.sleep(1.0)
    await js.publish("sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 5, usd="0.000123"))
    assert await asyncio.to_thread(crashing.wait, 30) == -signal.SIGKILL
    assert await debits(js) == [Decimal("0.000123")]
    assert await usage_records(js) == []

    spawn_billing()

    async def recorded() -> bool:
        return len(await usage_records(js)) == 1

    await until(recorded, timeout_s=30)
    await until(lambda: _drained(js, "SANDBOX_METER", "billing-meter"), timeout_s=30)
    assert await debits(js) == [Decimal("0.000123")]
    assert len(await usage_records(js)) == 1


async def test_money_adds_up_from_provision_to_fin_hub(
    worker: Any,
    start_billing: Start,
    settings: Settings,
    js: JetStreamContext,
    fin_hub: FakeFinHub,
) -> None:
    await start_billing(fin_hub_url=fin_hub.url)
    before = await Ledger(js).balance("acme")
    requests = [
        ProvisionRequest(request_id=f"m{i}", tenant="acme", profile="profile.burst-sandbox")
        for i in range(20)
    ]
    async with Client(settings.nats_url) as client:
        ready = await asyncio.gather(*(client.provision(r, wait_s=20) for r in requests))
        await asyncio.sleep(1.0)  # so that every sandbox costs something
        destroys = [
            DestroyRequest(request_id=f"d-{s.sandbox_id}", tenant="acme", sandbox_id=s.sandbox_id)
            for s in ready
            if s is not None
        ]
        await asyncio.gather(*(client.destroy(d, wait_s=20) for d in destroys))

    async def all_exported() -> bool:
        return len(fin_hub.accepted) == 20

    await until(all_exported, timeout_s=30)
    debited = sum(await debits(js), Decimal(0))
    recorded = sum((Decimal(r["actual_usd"]) for r in await usage_records(js)), Decimal(0))
    assert debited == recorded == fin_hub.total_usd() > 0
    after = await Ledger(js).balance("acme")
    assert after.holds == {}  # every hold released
    assert before.balance - after.balance == debited
    statuses = [s for s in ready if s is not None and s.state is SandboxState.READY]
    assert len(statuses) == 20


async def test_finhub_export_by_hand(
    tmp_path: Path, fin_hub: FakeFinHub, settings: Settings
) -> None:
    record = UsageRecord(
        record_id="usage-sbx-" + "a" * 24,
        sandbox_id="sbx-" + "a" * 24,
        extension_id="ext.saas-stub",
        tenant="acme",
        duration_s=Decimal("60"),
        actual_usd=Decimal("0.0006"),
        provider_cost_usd=Decimal("0.0006"),
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        stopped_at=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
    )
    path = tmp_path / "record.json"
    path.write_text(record.model_dump_json())
    command = ("finhub", "export", "--record", str(path), "--url", fin_hub.url)
    token = "s3cret-token"  # noqa: S105 - a test placeholder
    code, out, err = await sandboxer(settings, *command, SANDBOXER_FIN_HUB_TOKEN=token)
    assert code == 0, err
    assert "delivered" in out and "s3cret" not in out + err
    assert fin_hub.accepted[record.record_id]["actual_usd"] == "0.000600"
    assert fin_hub.authorizations == ["Bearer s3cret-token"]

    fin_hub.script.reject.add(record.record_id)
    code, _, err = await sandboxer(settings, *command)
    assert code == 1 and "rejected" in err and "422" in err


async def test_a_refusal_that_echoes_the_token_keeps_no_token(
    start_billing: Start, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    token = "fin-hub-s3cret"  # noqa: S105 - a test placeholder
    rejected = f"usage-sbx-{9:024x}"
    with FakeFinHub(Script(reject={rejected}, echo_auth=True)) as hub:
        await start_billing(fin_hub_url=hub.url, fin_hub_token=token)
        await js.publish("sandbox.meter.ext.saas-stub", await stopped_sandbox(js, 9))
        for _ in range(200):
            letters = await list_dead_letters(js)
            if letters:
                break
            await asyncio.sleep(0.05)
    [letter] = letters
    assert "HTTP 422" in letter.reason and "***" in letter.reason
    assert token not in letter.reason and token not in caplog.text
