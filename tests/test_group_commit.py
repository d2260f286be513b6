"""Decisions that queue behind one another for a tenant are written together: one
atomic batch per round trip, each decided on the balance the ones before leave.
Billing's debit and release decide nothing, and go without an expected sequence."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from nats.js import JetStreamContext

from sandboxer.connect import connection_of
from sandboxer.credits import Ledger
from sandboxer.errors import InsufficientCredits


def sandbox(i: int) -> str:
    return f"sbx-{i:024x}"


def replies(js: JetStreamContext) -> int:
    """Messages the connection has received: one per JetStream answer here."""
    return int(connection_of(js).stats["in_msgs"])


async def test_concurrent_holds_go_in_few_round_trips_and_never_overspend(
    js: JetStreamContext,
) -> None:
    ledger = Ledger(js)
    await ledger.grant("gc1", Decimal("10"), "g")
    await ledger.balance("gc1")  # a warm cache, as a running worker has
    before = replies(js)
    outcomes = await asyncio.gather(
        *(ledger.hold("gc1", sandbox(i), Decimal("0.3")) for i in range(50)),
        return_exceptions=True,
    )
    answers = replies(js) - before
    assert outcomes.count(True) == 33  # 33 x 0.3 <= 10 < 34 x 0.3
    assert all(isinstance(o, InsufficientCredits) for o in outcomes if o is not True)
    # One round trip for the first hold, one batch for the 49 that queued behind it,
    # and the reads that decide the refusals on the journal as it is.
    assert answers <= 6, answers
    balance = await Ledger(js).balance("gc1")
    assert (balance.held, len(balance.holds)) == (Decimal("9.9"), 33)


async def test_batches_of_two_processes_never_overspend(js: JetStreamContext) -> None:
    await Ledger(js).grant("gc2", Decimal("6"), "g")
    one, two = Ledger(js), Ledger(js)
    await asyncio.gather(one.balance("gc2"), two.balance("gc2"))
    outcomes = await asyncio.gather(
        *((one if i % 2 else two).hold("gc2", sandbox(i), Decimal("0.25")) for i in range(60)),
        return_exceptions=True,
    )
    assert outcomes.count(True) == 24
    balance = await Ledger(js).balance("gc2")
    assert balance.available == Decimal("0") and len(balance.holds) == 24


async def test_a_release_on_a_stale_cache_finds_the_hold_another_process_placed(
    js: JetStreamContext,
) -> None:
    """A decision that writes nothing is not taken on a cache: billing's ledger had
    read the tenant before a worker held a second sandbox, and used to find no hold
    to release (a BYOK sandbox's zero hold stayed open for ever)."""
    worker, billing = Ledger(js), Ledger(js)
    await worker.grant("gc3", Decimal("1"), "g")
    await worker.hold("gc3", sandbox(1), Decimal("0"))
    assert await billing.release("gc3", sandbox(1))  # billing's cache is warm now
    await worker.hold("gc3", sandbox(2), Decimal("0"))
    assert await billing.release("gc3", sandbox(2))
    assert not (await Ledger(js).balance("gc3")).holds


async def test_concurrent_bills_with_one_replayed_are_each_answered(
    js: JetStreamContext,
) -> None:
    earlier, billing = Ledger(js), Ledger(js)
    await earlier.grant("gc4", Decimal("10"), "g")
    for i in range(3):
        await earlier.hold("gc4", sandbox(i), Decimal("1"))
    assert await earlier.bill("gc4", sandbox(0), Decimal("0.5"), held=Decimal("1"))
    outcomes = await asyncio.gather(
        *(billing.bill("gc4", sandbox(i), Decimal("0.5"), held=Decimal("1")) for i in range(3))
    )
    assert outcomes == [False, True, True]
    balance = await Ledger(js).balance("gc4")
    assert (balance.balance, balance.holds) == (Decimal("8.5"), {})
    assert len(await billing.entries("gc4")) == 1 + 3 + 3 * 2


async def test_a_bill_after_a_fallback_releases_the_later_routes_hold(
    js: JetStreamContext,
) -> None:
    ledger = Ledger(js)
    await ledger.grant("gc5", Decimal("10"), "g")
    await ledger.hold("gc5", sandbox(1), Decimal("1"))
    await ledger.release("gc5", sandbox(1))  # the first route failed
    await ledger.hold("gc5", sandbox(1), Decimal("2"), route=2)
    assert await Ledger(js).bill("gc5", sandbox(1), Decimal("0.7"), held=Decimal("2"))
    balance = await Ledger(js).balance("gc5")
    assert (balance.balance, balance.holds) == (Decimal("9.3"), {})
    ids = [e.entry_id for e in await ledger.entries("gc5")]
    assert ids[-2:] == [f"debit-{sandbox(1)}", f"release-{sandbox(1)}-r2"]


async def test_a_writer_cancelled_mid_write_leaves_the_appends_behind_it_written(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = Ledger(js)
    await ledger.grant("gc6", Decimal("10"), "g")
    await ledger.balance("gc6")
    publish = ledger._publish
    calls = 0

    async def slow_first(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(30)
        return await publish(*args, **kwargs)

    monkeypatch.setattr(ledger, "_publish", slow_first)
    first = asyncio.create_task(ledger.hold("gc6", sandbox(0), Decimal("1")))
    await asyncio.sleep(0.1)  # it is writing
    behind = [asyncio.create_task(ledger.hold("gc6", sandbox(i), Decimal("1"))) for i in (1, 2)]
    await asyncio.sleep(0.1)  # they wait in its queue
    first.cancel()
    assert await asyncio.wait_for(asyncio.gather(*behind), 10) == [True, True]
    assert set((await Ledger(js).balance("gc6")).holds) == {sandbox(1), sandbox(2)}


async def test_a_batch_that_loses_the_race_is_not_sent_again_as_a_batch(
    js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process writes single holds for the same tenant, and gets in before
    every batch of this one. The batch's holds go one after the other then: sent
    again as a batch, bigger with what queued meanwhile, it lost every time (two
    processes on 64 tenants placed a third of one process's holds a second, and the
    server's CPU grew 7x), here until "too many concurrent writers"."""
    ledger, other = Ledger(js), Ledger(js)
    await ledger.grant("gc7", Decimal("100"), "g")
    await asyncio.gather(ledger.balance("gc7"), other.balance("gc7"))
    publish = ledger._publish
    batches = 0

    async def beaten_when_batched(tenant: str, entries: list[Any], last: int | None = None) -> int:
        nonlocal batches
        if len(entries) > 1:  # the other process's single hold lands first
            batches += 1
            await other.hold("gc7", sandbox(10_000 + batches), Decimal("0.01"))
        return await publish(tenant, entries, last)

    monkeypatch.setattr(ledger, "_publish", beaten_when_batched)
    first = asyncio.create_task(ledger.hold("gc7", sandbox(0), Decimal("1")))
    await asyncio.sleep(0)  # it writes; the next 30 queue behind it: a batch
    queued = [ledger.hold("gc7", sandbox(i), Decimal("1")) for i in range(1, 31)]
    assert await asyncio.wait_for(asyncio.gather(first, *queued), 60) == [True] * 31
    assert batches == 1
    balance = await Ledger(js).balance("gc7")
    assert balance.held == Decimal("31") + Decimal("0.01") * batches
