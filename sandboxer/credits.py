"""Prepaid credits: a per-tenant journal on JetStream, the only source of truth.

Every grant, hold, release and debit is one message on
`credits.ledger.<tenant>.<kind>.<entry_id>` in the CREDITS_LEDGER stream (see
docs/payments.md); nats-server's permissions say who may write which kind
(docs/security.md):

- the stream allows one message per subject and refuses the next one (discard new per
  subject), so an entry id is written at most once, ever: a replay a week later cannot
  debit again;
- every decision (a hold, a release) is appended right after the tenant entry it was
  decided on (`Nats-Expected-Last-Subject-Sequence` over `credits.ledger.<tenant>.>`),
  so two holds decided on the same balance cannot both land: the loser re-reads and
  decides again. No overspending, across any number of processes. Entries that decide
  nothing (a grant, billing's debit and release) go wherever the journal is;
- appends of a tenant that queue in a process are decided one after the other and
  written as one atomic batch (group commit): one round trip for many.

A tenant's balance is the fold of its entries, cached per process and caught up
incrementally; the server's checks make a stale cache harmless. An entry that does not
validate, or whose body does not agree with its subject (tenant, kind, id), is skipped
and logged: a junk message never breaks a tenant.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import json
import logging
from array import array
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError
from nats.nuid import NUID
from pydantic import TypeAdapter, ValidationError

from sandboxer import observe
from sandboxer.connect import connection_of
from sandboxer.errors import (
    IdempotencyConflict,
    InsufficientCredits,
    QuotaExceeded,
    SandboxerError,
)
from sandboxer.money import hold_entry_id, usd_text
from sandboxer.topology import (
    CHECKPOINT_STREAM,
    LEDGER_STREAM,
    MAX_CHECKPOINT_BYTES,
    checkpoint_subject,
    ledger_subject,
    read_subject,
    tenant_ledger,
)
from schemas import (
    AccountName,
    LedgerCheckpoint,
    LedgerEntry,
    LedgerKind,
    SpendRecord,
    TenantId,
    TenantLimits,
    utcnow,
)

log = logging.getLogger("sandboxer.credits")
_TENANT: TypeAdapter[str] = TypeAdapter(TenantId)
_ACCOUNT: TypeAdapter[str] = TypeAdapter(AccountName)

#: Server error codes: the expected last sequence moved; the entry id exists already.
_WRONG_LAST_SEQUENCE = 10071
_ENTRY_EXISTS = 10077

_MAX_CONFLICTS = 1000
#: Decisions written in one atomic batch (nats-server takes up to 1,000 messages),
#: and the fewest worth one: on a file-backed stream with one replica, nats-server
#: stages a batch on disk and syncs it at the commit, about 3 ms here against 0.3 ms
#: for one message, so a few queued decisions go one after the other instead.
_MAX_BATCH = 200
_MIN_BATCH = 12
_JS_TIMEOUT_S = 10.0


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


class _TenantLocks:
    """One lock per tenant, kept while anyone holds or waits for it: a hot tenant's
    appends never queue another tenant's (no shared stripes)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def held(self, tenant: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(tenant) or self._locks.setdefault(
            tenant, (asyncio.Lock(), [0])
        )
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[tenant]

    def __len__(self) -> int:
        return len(self._locks)


# Builds the entry to append from the current balance, returns None to skip it, or
# raises to refuse it; re-run after every conflict.
Decision = Callable[[Balance], LedgerEntry | None]


@dataclass(slots=True)
class _Ask:
    """A decision waiting for its tenant's writer. Its answer: True once written, False
    if it wrote nothing, or the refusal; None tells it to write itself, and those
    behind it."""

    decide: Decision
    answer: asyncio.Future[bool | None]


_Answer = bool | BaseException
_Decided = tuple[list[tuple[_Ask, LedgerEntry]], list[tuple[_Ask, _Answer]]]


def _decide_all(balance: Balance, asks: list[_Ask], *, apply: bool, fresh: bool) -> _Decided | None:
    """Decide each ask on `balance` (folding in the entries of those before, if
    `apply`): the entries to write, and the answers of the others once they are
    written. None if one was refused, or found nothing to write, on a balance that is
    not `fresh`: a cache may miss another process's hold, release or grant, so that is
    decided again on the journal as it is."""
    decided: list[tuple[_Ask, LedgerEntry]] = []
    answers: list[tuple[_Ask, _Answer]] = []
    for ask in asks:
        try:
            entry = ask.decide(balance)
        except SandboxerError as exc:
            if not fresh:
                return None
            answers.append((ask, exc))
            continue
        except Exception as exc:  # a bug in one decision answers that one alone
            answers.append((ask, exc))
            continue
        if entry is None:
            if not fresh:
                return None
            answers.append((ask, False))
            continue
        if apply:
            balance.apply(entry)
        decided.append((ask, entry))
    return decided, answers


def _take(asks: list[_Ask], queue: list[_Ask]) -> None:
    """Move waiting asks from `queue` to `asks`, up to a batch (cancelled ones go)."""
    room = _MAX_BATCH - len(asks)
    asks += [a for a in queue[:room] if not a.answer.done()]
    del queue[:room]


def _answer(answers: list[tuple[_Ask, _Answer]]) -> None:
    """Answer each ask not answered yet (nor cancelled: its caller is gone)."""
    for ask, answer in answers:
        if ask.answer.done():
            continue
        if isinstance(answer, BaseException):
            ask.answer.set_exception(answer)
        else:
            ask.answer.set_result(answer)


#: Entries folded between two checkpoints of a tenant.
CHECKPOINT_EVERY = 1000


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


def checked_tenant(tenant: str) -> str:
    """`tenant`, or ValueError if it is no tenant name (a wildcard would read every
    tenant's journal as one)."""
    try:
        return _TENANT.validate_python(tenant)
    except ValidationError:
        raise ValueError(f"not a tenant name: {tenant!r}") from None


def entry_of(tenant: str, subject: str, data: bytes) -> LedgerEntry | None:
    """The journal entry stored at `subject`, or None (logged) if it is not one of
    `tenant`'s, or says something else than its subject does."""
    try:
        entry = LedgerEntry.model_validate_json(data)
    except ValidationError as exc:
        log.warning(
            "ledger of %s: %s is no LedgerEntry, skipped (%d errors)",
            tenant,
            subject,
            exc.error_count(),
        )
        return None
    if subject != ledger_subject(tenant, entry.kind, entry.entry_id) or entry.tenant != tenant:
        log.warning(
            "ledger of %s: %s holds a %s entry %s of %s, skipped",
            tenant,
            subject,
            entry.kind,
            entry.entry_id,
            entry.tenant,
        )
        return None
    return entry


def _entry(
    kind: LedgerKind,
    tenant: str,
    amount: Decimal,
    entry_id: str,
    sandbox_id: str | None = None,
    note: str = "",
) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id,
        kind=kind,
        tenant=tenant,
        amount_usd=amount,
        sandbox_id=sandbox_id,
        at=utcnow(),
        note=note,
    )


class Ledger:
    """Appends to and reads the credits journal."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        cached_tenants: int = 10_000,
        checkpoint_every: int = CHECKPOINT_EVERY,
    ) -> None:
        self._js = js
        self._checkpoint_every = checkpoint_every
        #: Per tenant: the last checkpoint's seq and the entries folded since.
        self._since: dict[str, tuple[int | None, int]] = {}
        self._cache: OrderedDict[str, tuple[Balance, int]] = OrderedDict()
        self._cached_tenants = cached_tenants
        # Appends of one tenant are serialized inside a process (a lock of its own);
        # across processes the server's check does it.
        self._locks = _TenantLocks()
        #: Per tenant being written: the appends waiting for the writer.
        self._queues: dict[str, list[_Ask]] = {}
        self._batch_ids = NUID()

    # -- operations ------------------------------------------------------------------

    async def grant(self, tenant: str, amount: Decimal, grant_id: str, note: str = "") -> bool:
        """Add credits; False if `grant_id` was granted before, for this amount;
        `IdempotencyConflict` if it was granted for another."""
        checked_tenant(tenant)
        if amount <= 0:
            raise ValueError("a grant must be positive")
        entry = _entry("grant", tenant, amount, f"grant-{grant_id}", note=note)
        if await self._write_anywhere(tenant, entry):
            return True
        before = await self.entry(tenant, "grant", entry.entry_id)
        if before is not None and before.amount_usd != amount:
            raise IdempotencyConflict(
                f"{entry.entry_id} granted {usd_text(before.amount_usd)} USD to {tenant} already; "
                f"the same grant id cannot grant {usd_text(amount)}"
            )
        return False

    async def hold(
        self,
        tenant: str,
        sandbox_id: str,
        amount: Decimal,
        route: int = 1,
        *,
        limits: TenantLimits | None = None,
        who: str = "the tenant",
    ) -> bool:
        """Reserve `amount` for a sandbox on its `route`-th route, or raise
        `InsufficientCredits` (or `QuotaExceeded`, past one of the tenant's `limits`).
        A hold for a later route (after a fallback) replaces the sandbox's earlier
        hold. Idempotent: False if this hold exists (or existed)."""
        entry_id = hold_entry_id(sandbox_id, route)

        def decide(balance: Balance) -> LedgerEntry | None:
            if balance.hold_ids.get(sandbox_id) == entry_id:
                return None
            if route == 1 and sandbox_id in balance.holds:
                return None
            if limits is not None:
                balance.check(limits, sandbox_id, amount, utcnow(), who)
            available = balance.available + balance.holds.get(sandbox_id, Decimal(0))
            if available < amount:
                raise InsufficientCredits(
                    f"tenant {tenant} has {available:.6f} USD available, "
                    f"the sandbox needs a hold of {amount:.6f} USD"
                )
            return _entry("hold", tenant, amount, entry_id, sandbox_id)

        held = await self._append(tenant, decide)
        if held:
            observe.usd(observe.CREDITS_HELD_USD, amount)
        return held

    async def rehold(
        self,
        tenant: str,
        sandbox_id: str,
        amount: Decimal,
        key: str,
        *,
        limits: TenantLimits | None = None,
    ) -> bool:
        """Make a sandbox's open hold `amount` (a TTL extension, or its undoing), or raise
        `InsufficientCredits` if growing it is more than the tenant has available.
        Idempotent on `key`: False if this change was made before, or there is no open
        hold to change (the sandbox was billed)."""
        entry_id = f"hold-{sandbox_id}-x-{hashlib.sha256(key.encode()).hexdigest()[:16]}"

        def decide(balance: Balance) -> LedgerEntry | None:
            current = balance.holds.get(sandbox_id)
            if current is None or balance.hold_ids.get(sandbox_id) == entry_id:
                return None
            if limits is not None and amount > current:
                balance.check(limits, sandbox_id, amount, utcnow())
            if amount > current and balance.available + current < amount:
                raise InsufficientCredits(
                    f"tenant {tenant} has {balance.available:.6f} USD available, extending "
                    f"the sandbox needs {amount - current:.6f} USD more"
                )
            return _entry("hold", tenant, amount, entry_id, sandbox_id)

        return await self._append(tenant, decide)

    async def release(self, tenant: str, sandbox_id: str) -> bool:
        """Drop a sandbox's open hold (it was billed, or failed before it could be);
        False if there is none."""

        def decide(balance: Balance) -> LedgerEntry | None:
            held = balance.holds.get(sandbox_id)
            if held is None:
                return None
            # One release per hold entry (`release-<sandbox_id>` for a first route's),
            # so that a sandbox held again after a release can be released again.
            hold_id = balance.hold_ids.get(sandbox_id, f"hold-{sandbox_id}")
            entry_id = "release-" + hold_id.removeprefix("hold-")
            return _entry("release", tenant, held, entry_id, sandbox_id)

        return await self._append(tenant, decide)

    async def debit(self, tenant: str, sandbox_id: str, amount: Decimal) -> bool:
        """Charge a sandbox's actual cost; False if it was charged before (whenever
        that was)."""
        entry = _entry("debit", tenant, amount, f"debit-{sandbox_id}", sandbox_id)
        debited = await self._write_anywhere(tenant, entry)
        if debited:
            observe.usd(observe.CREDITS_DEBITED_USD, amount)
        return debited

    async def bill(
        self, tenant: str, sandbox_id: str, amount: Decimal, held: Decimal = Decimal(0)
    ) -> bool:
        """Debit a finished sandbox, then drop its hold (`held`, as its records say);
        True if this call debited.

        Neither is a decision: the cost is owed whatever the balance is, and the fold
        drops whatever the sandbox still holds. So both go wherever the journal is, and
        billing processes never wait for one another. Debit first: between the two
        entries the cost is counted twice (debited and still held), which can only
        refuse a hold, never let one overspend. If `release-<sbx>` exists, this is a
        replay, or the sandbox's first route's hold was released (it fell back to
        another route): the release is then decided on the journal."""
        debited = await self.debit(tenant, sandbox_id, amount)
        release = _entry("release", tenant, held, f"release-{sandbox_id}", sandbox_id)
        if not await self._write_anywhere(tenant, release):
            await self.release(tenant, sandbox_id)
        return debited

    async def balance(self, tenant: str) -> Balance:
        """The tenant's balance, read up to the latest entry."""
        checked_tenant(tenant)
        async with self._locks.held(tenant):
            balance, _ = await self._catch_up(tenant)
            return balance.copy()

    async def account(self, account: str) -> Balance:
        """A provider account's journal of slots (`~<extension>-platform`): its open
        holds are the sandboxes that hold one of its slots (docs/policy.md)."""
        _ACCOUNT.validate_python(account)
        async with self._locks.held(account):
            balance, _ = await self._catch_up(account)
            return balance.copy()

    async def entries(self, tenant: str) -> list[LedgerEntry]:
        """The tenant's journal, oldest first (entries that are not, skipped)."""
        checked_tenant(tenant)
        found = []
        async for _, subject, data in read_subject(self._js, LEDGER_STREAM, tenant_ledger(tenant)):
            entry = entry_of(tenant, subject, data)
            if entry is not None:
                found.append(entry)
        return found

    async def entry(self, tenant: str, kind: LedgerKind, entry_id: str) -> LedgerEntry | None:
        """One entry of the journal (the debit of a sandbox, say), or None."""
        subject = ledger_subject(checked_tenant(tenant), kind, entry_id)
        try:
            message = await self._js.get_msg(LEDGER_STREAM, subject=subject, direct=True)
        except NotFoundError:
            return None
        return entry_of(tenant, subject, message.data or b"")

    # -- the journal -----------------------------------------------------------------

    async def _write_anywhere(self, tenant: str, entry: LedgerEntry) -> bool:
        """Write an entry that decides nothing (a grant, a debit, billing's release)
        wherever the journal is: no expected sequence, no queue. False if it exists.
        The cache is left behind it, and reads it back when it next catches up."""
        try:
            await self._publish(tenant, [entry])
        except APIError as exc:
            if exc.err_code == _ENTRY_EXISTS:
                return False  # written before: a replay
            raise
        return True

    async def _append(self, tenant: str, decide: Decision) -> bool:
        """Append what `decide` builds, right after the tenant's latest entry; True if
        written.

        Group commit: while one task writes a tenant's entries, the decisions that come
        meanwhile wait in its queue, and the next writer decides them all, each on the
        balance the ones before it leave. Many are written as one atomic batch (one
        round trip, all or nothing); a few, one after the other."""
        ask = _Ask(decide, asyncio.get_running_loop().create_future())
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = []
        else:
            queue.append(ask)
            try:
                outcome = await ask.answer
            except asyncio.CancelledError:
                if ask.answer.done() and not ask.answer.cancelled():
                    self._hand_over(tenant, queue)  # it was to write next: the next one does
                raise
            if outcome is not None:
                return outcome
            ask.answer = asyncio.get_running_loop().create_future()  # its turn to write
        asks = [ask]
        try:
            async with self._locks.held(tenant):
                _take(asks, queue)  # those that came while it waited for the lock too
                await self._write(tenant, asks)
        except Exception as exc:  # the fate of the batch is unknown: each one retries
            _answer([(each, exc) for each in asks])
        finally:
            # Asks this writer did not answer (it was cancelled) go to the next one.
            queue[:0] = [a for a in asks[1:] if not a.answer.done()]
            self._hand_over(tenant, queue)
        written = ask.answer.result()
        assert written is not None
        return written

    def _hand_over(self, tenant: str, queue: list[_Ask]) -> None:
        """Make the first waiting append the tenant's next writer, if there is one."""
        while queue:
            following = queue.pop(0)
            if not following.answer.done():  # not cancelled meanwhile
                following.answer.set_result(None)
                return
        del self._queues[tenant]

    async def _write(self, tenant: str, asks: list[_Ask]) -> None:
        """Decide `asks` in order, each on the balance the ones before leave, write
        what they build right after the tenant's latest entry, and answer each."""
        if 1 < len(asks) < _MIN_BATCH:
            await self._one_by_one(tenant, asks)
            return
        cached = self._cache.get(tenant)
        balance, last = cached or await self._catch_up(tenant)
        fresh = cached is None
        for _ in range(_MAX_CONFLICTS):
            # Several asks are decided on a copy, which becomes the balance once written.
            trial = balance if len(asks) == 1 else balance.copy()
            outcome = _decide_all(trial, asks, apply=trial is not balance, fresh=fresh)
            if outcome is None:
                balance, last = await self._catch_up(tenant)
                fresh = True
                continue
            decided, answers = outcome
            entries = [entry for _, entry in decided]
            if not entries:
                _answer(answers)
                return
            try:
                seq = await self._publish(tenant, entries, last)
            except APIError as exc:
                if exc.err_code == _WRONG_LAST_SEQUENCE:
                    # Another process got in first: catch up and decide again. A batch
                    # lost the race: its entries go one after the other, as a batch
                    # sent again (bigger, with what queued meanwhile) loses it again
                    # to a process that writes singles.
                    balance, last = await self._catch_up(tenant)
                    fresh = True
                    if len(asks) > 1:
                        await self._one_by_one(tenant, asks)
                        return
                    continue
                if len(asks) > 1:
                    # One of them was written before (a replay), or the server takes
                    # no batch now: alone, each tells.
                    log.info("ledger of %s: batch of %d not written: %s", tenant, len(asks), exc)
                    await self._one_by_one(tenant, asks)
                    return
                if exc.err_code != _ENTRY_EXISTS:
                    raise
                _answer([(decided[0][0], False), *answers])  # written before: a replay
                return
            if trial is balance:
                balance.apply(entries[0])
            self._remember(tenant, trial, seq)
            _answer([(ask, True) for ask, _ in decided] + answers)
            await self._counted(tenant, trial, seq, len(entries))
            return
        raise RuntimeError(f"ledger of {tenant}: too many concurrent writers")

    async def _one_by_one(self, tenant: str, asks: list[_Ask]) -> None:
        """Write each ask alone, in order."""
        for ask in asks:
            try:
                await self._write(tenant, [ask])
            except Exception as failed:
                _answer([(ask, failed)])

    async def _publish(
        self, tenant: str, entries: list[LedgerEntry], last: int | None = None
    ) -> int:
        """Write `entries` (right after the tenant's entry `last`, if given): one
        message, or an atomic batch of them; the stream sequence of the last one.
        Nothing is written if another entry came after `last` (10071) or one of them
        exists (10077)."""
        guard = (
            {
                "Nats-Expected-Last-Subject-Sequence": str(last),
                "Nats-Expected-Last-Subject-Sequence-Subject": tenant_ledger(tenant),
            }
            if last is not None
            else {}
        )
        if len(entries) == 1:
            entry = entries[0]
            ack = await self._js.publish(
                ledger_subject(tenant, entry.kind, entry.entry_id),
                entry.model_dump_json().encode(),
                headers=guard or None,
            )
            return ack.seq
        nc = connection_of(self._js)
        batch = self._batch_ids.next().decode()
        for n, entry in enumerate(entries, 1):
            headers = {"Nats-Batch-Id": batch, "Nats-Batch-Sequence": str(n)}
            if n == 1:
                headers |= guard  # the whole batch follows `last`, or none of it is written
            subject = ledger_subject(tenant, entry.kind, entry.entry_id)
            data = entry.model_dump_json().encode()
            if n < len(entries):
                await nc.publish(subject, data, headers=headers)
                continue
            headers["Nats-Batch-Commit"] = "1"
            reply = await nc.request(subject, data, timeout=_JS_TIMEOUT_S, headers=headers)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise APIError.from_error(answer["error"])
        return int(answer["seq"])

    async def _catch_up(self, tenant: str) -> tuple[Balance, int]:
        """The cached balance brought up to date with the journal (under the lock).

        A known tenant reads what came after its cached fold; an unknown one starts
        from its latest checkpoint (a full fold if it has none, or one that does not
        check out). Both read in batches; a long fold writes a checkpoint."""
        cached = self._cache.get(tenant)
        if cached is not None:
            balance, last = cached
            entries = self._entries_after(tenant, last)
        else:
            checkpoint = await self._latest_checkpoint(tenant)
            balance = Balance.restored(checkpoint) if checkpoint else Balance()
            last = checkpoint.seq if checkpoint else 0
            self._since[tenant] = (checkpoint.seq if checkpoint else None, 0)
            entries = self._entries_after(tenant, last)
        folded = 0
        async for seq, subject, data in entries:
            entry = entry_of(tenant, subject, data)
            if entry is not None:
                balance.apply(entry)
            last = seq
            folded += 1
        self._remember(tenant, balance, last)
        await self._counted(tenant, balance, last, folded)
        return balance, last

    async def _counted(self, tenant: str, balance: Balance, last: int, folded: int) -> None:
        """Count entries folded since the tenant's last checkpoint; past
        `checkpoint_every`, write one (best effort: a reader without one folds more)."""
        previous, since = self._since.get(tenant, (None, 0))
        since += folded
        self._since[tenant] = (previous, since)
        if since < self._checkpoint_every or last == 0:
            return
        try:
            await self._write_checkpoint(tenant, balance.checkpoint(tenant, last, previous))
        except Exception as exc:  # a reader without it folds more; nothing is wrong
            log.warning("ledger of %s: checkpoint not written: %s", tenant, exc)
            return
        self._since[tenant] = (last, 0)

    async def _write_checkpoint(self, tenant: str, checkpoint: LedgerCheckpoint) -> None:
        data = checkpoint.model_dump_json().encode()
        if len(data) > MAX_CHECKPOINT_BYTES:
            log.info("ledger of %s: checkpoint of %d bytes not written", tenant, len(data))
            return
        await self._js.publish(
            checkpoint_subject(tenant),
            data,
            headers={"Nats-Msg-Id": f"{tenant}.{checkpoint.seq}"},
        )

    async def checkpoint(self, tenant: str) -> LedgerCheckpoint:
        """Write a checkpoint of the tenant's journal as it is now (an operator's, or a
        benchmark's: the service writes them every `checkpoint_every` entries)."""
        async with self._locks.held(tenant):
            balance, last = await self._catch_up(tenant)
            previous, _ = self._since.get(tenant, (None, 0))
            made = balance.checkpoint(tenant, last, previous)
            await self._write_checkpoint(tenant, made)
            self._since[tenant] = (last, 0)
            return made

    async def _catch_up_from_scratch(self, tenant: str) -> Balance:
        """The tenant's fold from its first entry, checkpoints aside (for `verify` and
        the tests)."""
        balance = Balance()
        async for _, subject, data in self._entries_after(tenant, 0):
            entry = entry_of(tenant, subject, data)
            if entry is not None:
                balance.apply(entry)
        return balance

    async def _latest_checkpoint(self, tenant: str) -> LedgerCheckpoint | None:
        """The tenant's latest checkpoint, if it has one that checks out."""
        try:
            message = await self._js.get_msg(
                CHECKPOINT_STREAM, subject=checkpoint_subject(tenant), direct=True
            )
        except NotFoundError:
            return None
        return checked_checkpoint(tenant, message.data or b"")

    async def verify(self, tenant: str) -> tuple[int, list[str]]:
        """Fold the tenant's journal from its first entry and compare it with every
        checkpoint of the chain: (checkpoints, what disagrees)."""
        checkpoints: list[tuple[LedgerCheckpoint | None, bytes]] = []
        async for _, _, data in read_subject(
            self._js, CHECKPOINT_STREAM, checkpoint_subject(tenant)
        ):
            checkpoints.append((checked_checkpoint(tenant, data), data))
        problems = [
            "a checkpoint does not check out (its digest, or its body)"
            for made, _ in checkpoints
            if made is None
        ]
        wanted = {c.seq: c for c, _ in checkpoints if c is not None}
        balance = Balance()
        async for seq, subject, data in self._entries_after(tenant, 0):
            entry = entry_of(tenant, subject, data)
            if entry is not None:
                balance.apply(entry)
            stored = wanted.pop(seq, None)
            if stored is not None:
                refolded = balance.checkpoint(tenant, seq, stored.previous)
                if refolded.digest != stored.digest:
                    problems.append(
                        f"the checkpoint at entry {seq} disagrees with the journal "
                        f"(balance {stored.balance} there, {refolded.balance} refolded)"
                    )
        problems += [f"the checkpoint at entry {seq} names no entry" for seq in wanted]
        return len(checkpoints), problems

    async def _entries_after(self, tenant: str, last: int) -> AsyncIterator[tuple[int, str, bytes]]:
        """(sequence, subject, data) of the tenant's entries after `last`, read with
        batched direct gets: one round trip per 256 entries, none of the cost of a
        consumer."""
        nc = connection_of(self._js)  # direct get batches answer many messages on one inbox
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox)
        try:
            while True:
                request = {"seq": last + 1, "next_by_subj": tenant_ledger(tenant), "batch": 256}
                await nc.publish(
                    f"$JS.API.DIRECT.GET.{LEDGER_STREAM}", json.dumps(request).encode(), inbox
                )
                while True:
                    message = await answers.next_msg(timeout=10.0)
                    headers = message.headers or {}
                    status = headers.get("Status")
                    if status == "404":
                        return  # nothing (more) to read
                    if status == "204":  # end of this batch
                        if headers.get("Nats-Num-Pending", "0") == "0":
                            return
                        break
                    if status is not None:
                        raise RuntimeError(f"ledger read failed: {status} {headers}")
                    last = int(headers["Nats-Sequence"])
                    yield last, headers.get("Nats-Subject", ""), message.data
        finally:
            await answers.unsubscribe()

    def _remember(self, tenant: str, balance: Balance, last: int) -> None:
        self._cache[tenant] = (balance, last)
        self._cache.move_to_end(tenant)
        while len(self._cache) > self._cached_tenants:
            self._cache.popitem(last=False)
