"""The credits journal: idempotent beyond the duplicate window, no overspending."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.credits import Balance, Ledger
from sandboxer.errors import InsufficientCredits
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.helpers import stub_sandboxes, wait_for_status


def sandbox(i: int) -> str:
    return f"sbx-{i:024x}"


async def test_grant_hold_debit_fold_into_balance(js: JetStreamContext) -> None:
    ledger = Ledger(js)
    assert await ledger.grant("acme", Decimal("10"), "welcome")
    assert await ledger.hold("acme", sandbox(1), Decimal("0.009"))
    balance = await ledger.balance("acme")
    assert (balance.balance, balance.held, balance.available) == (
        Decimal("10"),
        Decimal("0.009"),
        Decimal("9.991"),
    )
    assert await ledger.bill("acme", sandbox(1), Decimal("0.000046"))
    balance = await ledger.balance("acme")
    assert (balance.balance, balance.held) == (Decimal("9.999954"), Decimal("0"))
    kinds = [(e.kind, e.entry_id) for e in await ledger.entries("acme")]
    assert kinds == [
        ("grant", "grant-welcome"),
        ("hold", f"hold-{sandbox(1)}"),
        ("debit", f"debit-{sandbox(1)}"),
        ("release", f"release-{sandbox(1)}"),
    ]


async def test_entries_are_written_once_ever_even_from_a_fresh_process(
    js: JetStreamContext,
) -> None:
    first = Ledger(js)
    assert await first.grant("acme", Decimal("5"), "g1")
    assert await first.hold("acme", sandbox(1), Decimal("1"))
    assert await first.bill("acme", sandbox(1), Decimal("0.5"))
    # A process started later (empty cache, duplicate window long gone for all it
    # knows) replays everything: the server refuses every entry id it has seen.
    later = Ledger(js)
    assert not await later.grant("acme", Decimal("5"), "g1")
    assert not await later.hold("acme", sandbox(1), Decimal("1"))
    assert not await later.bill("acme", sandbox(1), Decimal("0.5"))
    assert not await later.release("acme", sandbox(1))
    assert (await later.balance("acme")).balance == Decimal("4.5")
    assert len(await later.entries("acme")) == 4


async def test_hold_beyond_available_is_refused(js: JetStreamContext) -> None:
    ledger = Ledger(js)
    await ledger.grant("acme", Decimal("1"), "g")
    await ledger.hold("acme", sandbox(1), Decimal("0.6"))
    with pytest.raises(InsufficientCredits, match=r"0\.400000 USD available"):
        await ledger.hold("acme", sandbox(2), Decimal("0.6"))
    assert await ledger.release("acme", sandbox(1))
    assert await ledger.hold("acme", sandbox(2), Decimal("0.6"))


async def test_concurrent_holds_from_many_processes_never_overspend(
    js: JetStreamContext,
) -> None:
    await Ledger(js).grant("hot", Decimal("20"), "g")
    # Four independent ledgers stand for four worker processes sharing one tenant.
    ledgers = [Ledger(js) for _ in range(4)]

    async def try_hold(i: int) -> bool:
        try:
            return await ledgers[i % 4].hold("hot", sandbox(i), Decimal("1"))
        except InsufficientCredits:
            return False

    results = await asyncio.gather(*(try_hold(i) for i in range(100)))
    assert sum(results) == 20
    balance = await Ledger(js).balance("hot")
    assert balance.held == Decimal("20") and balance.available == Decimal("0")


async def test_tenants_do_not_share_a_balance(js: JetStreamContext) -> None:
    ledger = Ledger(js)
    await ledger.grant("a", Decimal("1"), "g")
    with pytest.raises(InsufficientCredits):
        await ledger.hold("b", sandbox(1), Decimal("0.1"))
    # "a" is also a prefix of "ab": subjects keep them apart.
    await ledger.grant("ab", Decimal("2"), "g")
    assert (await ledger.balance("a")).balance == Decimal("1")


async def test_200_concurrent_provisions_against_credits_for_20(
    worker: object, settings: Settings, js: JetStreamContext
) -> None:
    estimate = Decimal("0.009000")  # profile.burst-sandbox: 900 s x 0.000010 USD/s
    ledger = Ledger(js)
    await ledger.grant("frugal", estimate * 20, "g")
    async with Client(settings.nats_url) as client:
        await asyncio.gather(
            *(
                client.provision(
                    ProvisionRequest(
                        request_id=f"r{i}", tenant="frugal", profile="profile.burst-sandbox"
                    )
                )
                for i in range(200)
            )
        )
        statuses = await asyncio.gather(
            *(wait_for_status(client, sandbox_id_for("frugal", f"r{i}")) for i in range(200))
        )
    ready = [s for s in statuses if s.state is SandboxState.READY]
    refused = [s for s in statuses if s.state is SandboxState.FAILED]
    assert len(ready) == 20 and len(refused) == 180
    assert {s.error.code for s in refused if s.error} == {ErrorCode.INSUFFICIENT_CREDITS}
    assert len(await stub_sandboxes(js)) == 20

    # Replaying the journal entry by entry, the balance never went below zero.
    running = Balance()
    for entry in await ledger.entries("frugal"):
        running.apply(entry)
        assert running.available >= 0
    assert running.available == 0


async def test_a_long_journal_is_folded_exactly_by_a_fresh_process(js: JetStreamContext) -> None:
    writer = Ledger(js)
    await asyncio.gather(*(writer.grant("busy", Decimal("0.000001"), f"g{i}") for i in range(600)))
    await writer.grant("other", Decimal("5"), "g0")  # interleaved tenant, not folded in
    fresh = await Ledger(js).balance("busy")  # reads 600 entries in batches of 256
    assert fresh.balance == Decimal("0.000600")
