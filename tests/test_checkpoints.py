"""Ledger checkpoints over real NATS: a cold read starts at the latest checkpoint and
folds only what came after, to the same balance as a fold from the first entry; a
checkpoint that does not check out is refused by the reader and by `verify`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from nats.js import JetStreamContext

from sandboxer.credits import Balance, Ledger
from sandboxer.errors import QuotaExceeded
from sandboxer.settings import Settings
from sandboxer.topology import CHECKPOINT_STREAM, checkpoint_subject, read_subject
from schemas import LedgerCheckpoint, TenantLimits
from tests.helpers import sandboxer


def sandbox(i: int) -> str:
    return f"sbx-{i:024x}"


async def busy_journal(ledger: Ledger, tenant: str, n: int) -> None:
    """`n` sandboxes' worth of entries: grant, then hold, debit and release each (some
    left held), so that holds, spend windows and billed records all cross checkpoints."""
    await ledger.grant(tenant, Decimal(1000), "g")
    for i in range(n):
        await ledger.hold(tenant, sandbox(i), Decimal("0.009"))
        if i % 3:
            await ledger.bill(tenant, sandbox(i), Decimal("0.004"))


def projection(balance: Balance) -> str:
    """What a checkpoint keeps of a fold, minus where it stands."""
    made = balance.checkpoint("t", 1, None)
    body = made.model_dump(mode="json", exclude={"seq", "digest", "previous", "tenant", "at"})
    return json.dumps(body, sort_keys=True)


async def checkpoints(js: JetStreamContext, tenant: str) -> list[LedgerCheckpoint]:
    return [
        LedgerCheckpoint.model_validate_json(data)
        async for _, _, data in read_subject(js, CHECKPOINT_STREAM, checkpoint_subject(tenant))
    ]


async def test_a_cold_read_starts_at_the_latest_checkpoint_and_agrees(
    js: JetStreamContext,
) -> None:
    await busy_journal(Ledger(js, checkpoint_every=25), "ck1", 60)  # about 140 entries
    chain = await checkpoints(js, "ck1")
    assert len(chain) >= 4 and [c.previous for c in chain[1:]] == [c.seq for c in chain[:-1]]
    # A restarted process: from the checkpoint, and from the first entry.
    cold = await Ledger(js).balance("ck1")
    full = await Ledger(js, checkpoint_every=10**9)._catch_up_from_scratch("ck1")
    assert projection(cold) == projection(full)
    assert cold.balance == Decimal(1000) - 40 * Decimal("0.004")
    assert len(cold.holds) == 20 and cold.held == 20 * Decimal("0.009")
    now = datetime.now(UTC)
    assert cold.hour_spend(now) == full.hour_spend(now)
    assert cold.creates_last_minute(now) == full.creates_last_minute(now) == 60
    # limits decided on a restored fold decide as on the full one
    limits = TenantLimits(max_concurrent=20)
    for fold in (cold, full):
        with pytest.raises(QuotaExceeded, match="max_concurrent"):
            fold.check(limits, sandbox(999), Decimal(0), now)
    count, problems = await Ledger(js).verify("ck1")
    assert count == len(chain) and problems == []


async def test_a_corrupt_or_forged_checkpoint_is_refused(
    js: JetStreamContext, settings: Settings
) -> None:
    ledger = Ledger(js, checkpoint_every=10**9)
    await busy_journal(ledger, "ck2", 10)
    good = await ledger.checkpoint("ck2")
    # Corrupt: a balance changed under the old digest. The reader does not use it.
    corrupt = LedgerCheckpoint.model_validate({**good.model_dump(), "balance": "999999"})
    await js.publish(checkpoint_subject("ck2"), corrupt.model_dump_json().encode())
    assert (await Ledger(js).balance("ck2")).balance == good.balance
    code, out, err = await sandboxer(settings, "credits", "verify", "ck2")
    assert code == 1 and "does not check out" in err, (out, err)
    # Forged: a consistent digest over a wrong balance. Only a refold can tell.
    forged = LedgerCheckpoint.model_validate({**good.model_dump(), "balance": "999999"})
    forged = forged.model_copy(update={"digest": forged.body_digest()})
    await js.publish(checkpoint_subject("ck2"), forged.model_dump_json().encode())
    count, problems = await Ledger(js).verify("ck2")
    assert count == 3
    assert any("disagrees with the journal" in p and "999999" in p for p in problems), problems
    code, out, err = await sandboxer(settings, "credits", "verify", "ck2", "--json")
    assert code == 1 and json.loads(out)["checkpoints"] == 3
