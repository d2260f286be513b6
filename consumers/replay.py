"""Operator replay: publish stored messages of a subject again, so that their consumers
see them once more. Every handler is idempotent (deterministic ids, claims, markers),
so replaying a whole day changes nothing already applied and applies what was missed.

Mechanism: **republish**. The messages of the range are read from their stream
(`topology.stored_messages`: a short-lived pull consumer from a sequence or a time)
and published again on their own subject, with their original headers minus
JetStream's own (`Nats-Msg-Id`, which would make the stream drop them as duplicates,
and schedule headers), plus `Sandboxer-Replay: <stream>/<seq>`. They then flow
through the normal durable consumers, with the workers' concurrency, retries and dead
letters. Messages that are
themselves replays are skipped unless asked for, so replaying a range twice does not
snowball.

Before publishing, each message is classified by what its consumer will find, which
is also what `--dry-run` prints: `applied` (its effect is already recorded: a claim,
a `destroyed` status, a usage marker, an export marker), `new` (it will have an
effect), `no-op` (nothing to do: a `started` meter event, a destroy of an unknown
sandbox) or `invalid` (it will be dead-lettered).
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, ValidationError

from adapters.registry import Registry
from sandboxer.ids import sandbox_id_for
from sandboxer.markers import BillingMarkers
from sandboxer.statuses import StatusStore
from sandboxer.topology import (
    BILLING_STREAM,
    DESTROY_SUBJECT,
    EXPORT_CONSUMER,
    METER_STREAM,
    METER_SUBJECT_PREFIX,
    PROVISION_SUBJECT,
    REQUESTS_STREAM,
    USAGE_SUBJECT,
    StoredMessage,
    republishable_headers,
    stored_messages,
)
from schemas import (
    DestroyRequest,
    MeterEvent,
    ProvisionRequest,
    SandboxState,
    TenantId,
    UsageRecord,
    usage_record_id,
)

H_REPLAY = "Sandboxer-Replay"
#: What a replayed message will do when its consumer sees it.
Effect = Literal["applied", "new", "no-op", "invalid"]

#: The subjects that can be replayed, and the stream that keeps them.
REPLAYABLE = {
    PROVISION_SUBJECT: REQUESTS_STREAM,
    DESTROY_SUBJECT: REQUESTS_STREAM,
    f"{METER_SUBJECT_PREFIX}.>": METER_STREAM,
    USAGE_SUBJECT: BILLING_STREAM,
}


def stream_of(subject: str) -> str:
    """The stream that keeps `subject`, or ValueError naming what can be replayed."""
    if subject in REPLAYABLE:
        return REPLAYABLE[subject]
    if subject.startswith(f"{METER_SUBJECT_PREFIX}."):
        return METER_STREAM
    if _is_request(subject, PROVISION_SUBJECT) or _is_request(subject, DESTROY_SUBJECT):
        return REQUESTS_STREAM  # one consumer's (`sandbox.provision.<name>`), or all (`.*`)
    raise ValueError(
        f"cannot replay {subject!r}; replayable: {', '.join(REPLAYABLE)}, "
        f"{PROVISION_SUBJECT}.<consumer>, {DESTROY_SUBJECT}.<consumer>, "
        f"{METER_SUBJECT_PREFIX}.<extension_id>"
    )


_RELATIVE = re.compile(r"^(\d+)([smhd])$")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC if it has no zone), or a duration ago: `30m`, `2h`, `1d`."""
    found = _RELATIVE.match(text.strip())
    if found:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[found.group(2)]
        return (now or datetime.now(UTC)) - timedelta(**{unit: int(found.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (ISO 8601, or ago: 30m, 2h, 1d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Range:
    """Which stored messages: from a sequence or time, to a sequence or time."""

    from_seq: int | None = None
    since: datetime | None = None
    to_seq: int | None = None
    until: datetime | None = None

    def ended_by(self, seq: int, at: datetime) -> bool:
        return (self.to_seq is not None and seq > self.to_seq) or (
            self.until is not None and at > self.until
        )


@dataclass
class Summary:
    """What a replay found (and, unless dry, published again)."""

    subject: str
    dry_run: bool
    first_seq: int | None = None
    last_seq: int | None = None
    replayed: int = 0
    skipped_replays: int = 0
    skipped_tenants: int = 0
    stored: int = 0  # on the subject, in or out of the range
    effects: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        if self.first_seq:
            span = f"seq {self.first_seq}..{self.last_seq}"
        elif self.stored:
            span = f"none of the {self.stored} stored is in the range"
        else:
            span = "nothing stored"
        verb = "would replay" if self.dry_run else "replayed"
        counts = ", ".join(f"{self.effects[e]} {e}" for e in ("applied", "new", "no-op", "invalid"))
        return (
            f"{verb} {self.replayed} message(s) of {self.subject} ({span}): {counts}; "
            f"skipped {self.skipped_replays} earlier replay(s), "
            f"{self.skipped_tenants} of other tenants"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject,
            "dry_run": self.dry_run,
            "stored": self.stored,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "replayed": self.replayed,
            "skipped_replays": self.skipped_replays,
            "skipped_tenants": self.skipped_tenants,
            "effects": {e: self.effects[e] for e in ("applied", "new", "no-op", "invalid")},
        }


class Judge:
    """What each message's consumer will find, read from the same state it reads."""

    def __init__(
        self, registry: Registry, statuses: StatusStore, markers: BillingMarkers, exporting: bool
    ) -> None:
        self._registry = registry
        self._statuses = statuses
        self._markers = markers
        self._exporting = exporting

    async def tenant_and_effect(self, subject: str, data: bytes) -> tuple[str | None, Effect]:
        try:
            if _is_request(subject, PROVISION_SUBJECT):
                request = ProvisionRequest.model_validate_json(data)
                owner = self._registry.owner_of(request.tenant)
                sandbox_id = sandbox_id_for(request.tenant, request.request_id)
                found = await self._statuses.get(owner, sandbox_id)
                return request.tenant, "applied" if found else "new"
            if _is_request(subject, DESTROY_SUBJECT):
                destroy = DestroyRequest.model_validate_json(data)
                owner = self._registry.owner_of(destroy.tenant)
                found = await self._statuses.get(owner, destroy.sandbox_id)
                if found is None or found[0].tenant != destroy.tenant:
                    return destroy.tenant, "no-op"
                done = found[0].state in (SandboxState.DESTROYED, SandboxState.FAILED)
                return destroy.tenant, "applied" if done else "new"
            if subject == USAGE_SUBJECT:
                record = UsageRecord.model_validate_json(data)
                if not self._exporting:  # no exporter: records just stay on the stream
                    return record.tenant, "no-op"
                return record.tenant, _effect(await self._markers.exported(record.record_id))
            event = MeterEvent.model_validate_json(data)
            if event.kind != "stopped":
                return event.tenant, "no-op"
            published = await self._markers.published(usage_record_id(event.sandbox_id))
            return event.tenant, _effect(published)
        except ValidationError:
            try:
                return _Tenant.model_validate_json(data).tenant, "invalid"
            except ValidationError:
                return None, "invalid"


class _Tenant(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tenant: TenantId


def _is_request(subject: str, plain: str) -> bool:
    return subject == plain or subject.startswith(f"{plain}.")


def _effect(applied: bool) -> Effect:
    return "applied" if applied else "new"


def republish_headers(stored: StoredMessage, stream: str) -> dict[str, str]:
    """The original headers without JetStream's own, marked as a replay."""
    return {**republishable_headers(stored.headers), H_REPLAY: f"{stream}/{stored.seq}"}


async def replay(
    js: JetStreamContext,
    subject: str,
    span: Range,
    *,
    registry: Registry,
    tenant: str | None = None,
    dry_run: bool = False,
    include_replays: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Summary:
    """Replay the stored messages of `subject` in `span` (of one `tenant`); with
    `dry_run`, only say what would happen. `progress(done, left)` is called every 1,000
    messages."""
    stream = stream_of(subject)
    try:
        await js.consumer_info(BILLING_STREAM, EXPORT_CONSUMER)
        exporting = True
    except NotFoundError:
        exporting = False
    judge = Judge(registry, await StatusStore.open(js), await BillingMarkers.open(js), exporting)
    info = await js.stream_info(stream, subjects_filter=subject)
    summary = Summary(subject, dry_run, stored=sum((info.state.subjects or {}).values()))
    seen = 0
    messages = stored_messages(js, stream, subject, from_seq=span.from_seq, since=span.since)
    async with contextlib.aclosing(messages):  # an early end drops the read consumer now
        async for stored in messages:
            if span.ended_by(stored.seq, stored.at):
                break
            seen += 1
            if progress is not None and seen % 1000 == 0:
                progress(seen, stored.left)
            summary.first_seq = summary.first_seq or stored.seq
            summary.last_seq = stored.seq
            if H_REPLAY in stored.headers and not include_replays:
                summary.skipped_replays += 1
                continue
            owner, effect = await judge.tenant_and_effect(stored.subject, stored.data)
            if tenant is not None and owner != tenant:
                summary.skipped_tenants += 1
                continue
            summary.effects[effect] += 1
            summary.replayed += 1
            if not dry_run:
                await js.publish(
                    stored.subject, stored.data, headers=republish_headers(stored, stream)
                )
    return summary
