"""A tenant's credits as the fold of its journal (`sandboxer/credits.py` reads and
writes the journal): the balance, the open holds, the spend windows and creations
the consumer policy's limits are checked against, and the checkpoints of that fold.
Nothing here does I/O."""

from __future__ import annotations

import bisect
import logging
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import ValidationError

from sandboxer.errors import QuotaExceeded
from sandboxer.money import usd_text
from schemas import LedgerCheckpoint, LedgerEntry, SpendRecord, TenantLimits, utcnow

log = logging.getLogger("sandboxer.credits")


def _hour(moment: datetime) -> int:
    """The UTC hour a moment falls in, as hours since the epoch."""
    return int(moment.timestamp() // 3600)


def _first_hour_of_day(moment: datetime) -> int:
    return _hour(moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0))


#: How far back the spend windows look (a UTC day, and an hour of slack).
_WINDOW_HOURS = 25


@dataclass
class Balance:
    """A tenant's credits: `balance` is granted minus debited; `holds` are open
    reservations by sandbox id; `available` is what a new hold may take.

    For the consumer policy's limits (docs/policy.md) it also keeps what the last day's
    sandboxes spent, by the UTC hour each was created in (its hold while open, its debit
    once billed, nothing if released unbilled), and when each was created."""

    balance: Decimal = Decimal("0")
    holds: dict[str, Decimal] = field(default_factory=dict)
    #: The entry behind each open hold (a fallback to another route re-holds).
    hold_ids: dict[str, str] = field(default_factory=dict, repr=False)
    #: The sum of `holds`, kept as they change (a hot tenant has thousands).
    held: Decimal = field(default=Decimal("0"), repr=False)
    #: sandbox id -> (created at, epoch seconds; what it counts for; billed), oldest
    #: first: the last day's sandboxes.
    spend: dict[str, tuple[float, Decimal, bool]] = field(default_factory=dict, repr=False)
    by_hour: dict[int, Decimal] = field(default_factory=dict, repr=False)
    #: When each recent sandbox was created, in order, from `created_from` on (a flat
    #: array: counting the last minute's is a binary search, not a scan).
    created: array[float] = field(default_factory=lambda: array("d"), repr=False)
    created_from: int = field(default=0, repr=False)
    #: The time of the last entry folded in.
    last_at: datetime | None = field(default=None, repr=False)

    @property
    def available(self) -> Decimal:
        return self.balance - self.held

    def apply(self, entry: LedgerEntry) -> None:
        """Fold one journal entry in."""
        self.last_at = entry.at
        if entry.kind == "grant":
            self.balance += entry.amount_usd
        elif entry.kind == "hold" and entry.sandbox_id is not None:
            before = self.holds.get(entry.sandbox_id, Decimal(0))
            self.holds[entry.sandbox_id] = entry.amount_usd  # a later hold replaces
            self.held += entry.amount_usd - before
            self.hold_ids[entry.sandbox_id] = entry.entry_id
            self._spent(entry, entry.amount_usd)
        elif entry.kind == "release" and entry.sandbox_id is not None:
            self.held -= self.holds.pop(entry.sandbox_id, Decimal(0))
            self.hold_ids.pop(entry.sandbox_id, None)
            self._spent(entry, Decimal(0))
        elif entry.kind == "debit":
            self.balance -= entry.amount_usd
            self._spent(entry, entry.amount_usd, billed=True)

    def _spent(self, entry: LedgerEntry, amount: Decimal, *, billed: bool = False) -> None:
        """Count what a sandbox spends now in the hour it was created in."""
        sandbox_id = entry.sandbox_id
        if sandbox_id is None:
            return
        record = self.spend.get(sandbox_id)
        if record is None:
            if entry.kind != "hold":
                return  # created before the window: it no longer counts
            record = (entry.at.timestamp(), Decimal(0), False)
            self.created.append(record[0])
            self._forget_before(entry.at)
        created, counted, was_billed = record
        if was_billed:
            return  # billed: the debit is what it spent
        hour = int(created // 3600)
        self.by_hour[hour] = self.by_hour.get(hour, Decimal(0)) + amount - counted
        self.spend[sandbox_id] = (created, amount, billed)

    def _forget_before(self, now: datetime) -> None:
        oldest = _hour(now) - _WINDOW_HOURS
        while self.spend:
            first = next(iter(self.spend))
            if self.spend[first][0] // 3600 >= oldest:
                break
            del self.spend[first]
        for hour in [h for h in self.by_hour if h < oldest]:
            del self.by_hour[hour]

    def hour_spend(self, now: datetime) -> Decimal:
        """What the sandboxes created this UTC hour spent or hold."""
        return self.by_hour.get(_hour(now), Decimal(0))

    def day_spend(self, now: datetime) -> Decimal:
        """What the sandboxes created this UTC day spent or hold."""
        first = _first_hour_of_day(now)
        return sum((v for h, v in self.by_hour.items() if h >= first), Decimal(0))

    def creates_last_minute(self, now: datetime) -> int:
        """Sandboxes created in the 60 s before `now` (older ones are forgotten: time
        only moves on)."""
        first = bisect.bisect_right(self.created, now.timestamp() - 60, lo=self.created_from)
        self.created_from = first
        if first > 4096 and first * 2 > len(self.created):
            del self.created[:first]
            self.created_from = 0
        return len(self.created) - self.created_from

    def check(
        self,
        limits: TenantLimits,
        sandbox_id: str,
        amount: Decimal,
        now: datetime,
        who: str = "the tenant",
    ) -> None:
        """Raise `QuotaExceeded` if holding `amount` for `sandbox_id` now would go past
        one of `limits`, naming it."""
        tenant_has = f"{who} has"
        if sandbox_id not in self.holds:  # a new sandbox, not a fallback's re-hold
            if limits.max_concurrent is not None and len(self.holds) >= limits.max_concurrent:
                raise QuotaExceeded(
                    f"max_concurrent: {tenant_has} {len(self.holds)} sandboxes running, "
                    f"its limit is {limits.max_concurrent}"
                )
            created = self.creates_last_minute(now)
            if limits.creates_per_minute is not None and created >= limits.creates_per_minute:
                raise QuotaExceeded(
                    f"creates_per_minute: {tenant_has} created {created} sandboxes in the "
                    f"last minute, its limit is {limits.creates_per_minute}"
                )
        # What this sandbox already counts for (a fallback's or an extension's re-hold).
        record = self.spend.get(sandbox_id)
        hour = int(record[0] // 3600) if record else None
        this_hour = record[1] if record and hour == _hour(now) else Decimal(0)
        this_day = (
            record[1]
            if record and hour is not None and hour >= _first_hour_of_day(now)
            else Decimal(0)
        )
        for name, cap, spent in (
            ("hourly_usd", limits.hourly_usd, self.hour_spend(now) - this_hour),
            ("daily_usd", limits.daily_usd, self.day_spend(now) - this_day),
        ):
            if cap is not None and spent + amount > cap:
                raise QuotaExceeded(
                    f"{name}: {tenant_has} spent or holds {spent:.6f} of {usd_text(cap)} USD "
                    f"this {'hour' if name == 'hourly_usd' else 'day'}; the sandbox needs "
                    f"{amount:.6f}"
                )

    def checkpoint(self, tenant: str, seq: int, previous: int | None) -> LedgerCheckpoint:
        """This fold as the checkpoint of entry `seq`: what a later fold needs of it
        (open holds and their spend records, the spend by hour, the last minute's
        creations); settled sandboxes' records are final and kept in `by_hour` only."""
        at = self.last_at or utcnow()
        cutoff = at.timestamp() - 60
        body = LedgerCheckpoint(
            tenant=tenant,
            seq=seq,
            at=at,
            balance=self.balance,
            holds=self.holds,
            hold_ids={s: h for s, h in self.hold_ids.items() if h != f"hold-{s}"},
            spend={
                s: SpendRecord(created=r[0], counted=r[1], billed=r[2])
                for s, r in self.spend.items()
                if s in self.holds
            },
            by_hour=self.by_hour,
            recent_creates=[t for t in self.created[self.created_from :] if t > cutoff],
            previous=previous,
        )
        return body.model_copy(update={"digest": body.body_digest()})

    @classmethod
    def restored(cls, checkpoint: LedgerCheckpoint) -> Balance:
        """The fold a checkpoint was taken of, as later entries need it."""
        balance = cls(
            checkpoint.balance,
            dict(checkpoint.holds),
            {s: checkpoint.hold_ids.get(s, f"hold-{s}") for s in checkpoint.holds},
            sum(checkpoint.holds.values(), Decimal(0)),
            {
                s: (r.created, r.counted, r.billed)
                for s, r in sorted(checkpoint.spend.items(), key=lambda item: item[1].created)
            },
            dict(checkpoint.by_hour),
            array("d", sorted(checkpoint.recent_creates)),
        )
        balance.last_at = checkpoint.at
        return balance

    def copy(self) -> Balance:
        """A copy that later folds do not change."""
        return Balance(
            self.balance,
            dict(self.holds),
            dict(self.hold_ids),
            self.held,
            dict(self.spend),
            dict(self.by_hour),
            array("d", self.created[self.created_from :]),
            last_at=self.last_at,
        )


def checked_checkpoint(tenant: str, data: bytes) -> LedgerCheckpoint | None:
    """The checkpoint in `data` if it is one of `tenant`'s whose digest matches."""
    try:
        checkpoint = LedgerCheckpoint.model_validate_json(data)
    except ValidationError:
        log.warning("ledger of %s: a checkpoint that is no LedgerCheckpoint, not used", tenant)
        return None
    if checkpoint.tenant != tenant or checkpoint.digest != checkpoint.body_digest():
        log.warning(
            "ledger of %s: checkpoint at %d does not check out, not used", tenant, checkpoint.seq
        )
        return None
    return checkpoint
