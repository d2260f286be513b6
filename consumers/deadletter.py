"""Dead letters: messages a consumer could not process are kept, never dropped.

A message goes to `sandbox.dlq.<consumer>` (stream DEAD_LETTERS) when

- its handler gives up on it: poison (it does not validate), or its retries ran out
  (`SANDBOXER_MAX_DELIVER` deliveries of a transient failure, an unexpected error);
- the server gives up on it: a consumer's `max_deliver` was reached without any answer
  (the worker died on every delivery). nats-server announces that with a
  `MAX_DELIVERIES` advisory, which the ADVISORIES stream keeps until a worker turns it
  into a dead letter.

A dead letter is the original body and headers, unchanged, plus `Sandboxer-Dlq-*`
headers: where it came from (stream, sequence, subject, consumer), how often it was
delivered, when, and why. Its `Nats-Msg-Id` is derived from the origin, so the handler
and the advisory never keep the same message twice.

`sandboxer dlq ls | show ID | retry ID [--body FILE] | drop ID` works on them; retry
publishes the body (or a fixed one) again on its subject, marked `Sandboxer-Retry`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandboxer import observe
from sandboxer.connect import connection_of
from sandboxer.errors import validation_problems
from sandboxer.topology import (
    DEAD_LETTER_STREAM,
    DLQ_SUBJECT_PREFIX,
    republishable_headers,
    stored_messages,
)
from schemas import utcnow

log = logging.getLogger("sandboxer.deadletter")

H_REASON = "Sandboxer-Dlq-Reason"
H_STREAM = "Sandboxer-Dlq-Stream"
H_SEQ = "Sandboxer-Dlq-Seq"
H_SUBJECT = "Sandboxer-Dlq-Subject"
H_CONSUMER = "Sandboxer-Dlq-Consumer"
H_DELIVERIES = "Sandboxer-Dlq-Deliveries"
H_AT = "Sandboxer-Dlq-At"
H_MSG_ID = "Sandboxer-Dlq-Msg-Id"
#: A letter whose original did not fit: the original's size and sha256; or how many
#: original headers were dropped.
H_TRUNCATED = "Sandboxer-Dlq-Truncated"
H_SHA256 = "Sandboxer-Dlq-Sha256"
H_HEADERS_DROPPED = "Sandboxer-Dlq-Headers-Dropped"
#: On a message published by `dlq retry`: the dead letter it came from. A provision
#: carrying it may reopen its `failed` claim (an operator asked for another try).
H_RETRY = "Sandboxer-Retry"
MAX_REASON = 1000


@dataclass(frozen=True)
class Origin:
    """Where a message was consumed from."""

    stream: str
    seq: int
    subject: str
    consumer: str
    deliveries: int


@dataclass(frozen=True)
class DeadLetter:
    """A kept message, as `sandboxer dlq` shows it. `id` is its DEAD_LETTERS sequence."""

    id: int
    origin: Origin
    reason: str
    at: datetime | None
    data: bytes
    headers: dict[str, str]

    @property
    def original_headers(self) -> dict[str, str]:
        """The headers the message had (its own `Nats-Msg-Id` is kept apart, under
        `Sandboxer-Dlq-Msg-Id`, since the dead letter has an id of its own)."""
        return {
            k: v
            for k, v in self.headers.items()
            if not k.startswith("Sandboxer-Dlq-") and k != "Nats-Msg-Id"
        }

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "consumer": self.origin.consumer,
            "subject": self.origin.subject,
            "stream": self.origin.stream,
            "seq": self.origin.seq,
            "deliveries": self.origin.deliveries,
            "reason": self.reason,
            "at": self.at.isoformat() if self.at else None,
            "truncated_from": self.headers.get(H_TRUNCATED),
            "sha256": self.headers.get(H_SHA256),
        }


class _Advisory(BaseModel):
    """What sandboxer reads of nats-server's `MAX_DELIVERIES` advisory."""

    model_config = ConfigDict(extra="ignore")

    stream: str = Field(max_length=256)
    consumer: str = Field(default="?", max_length=256)
    stream_seq: int = Field(default=0, ge=0)
    deliveries: int = Field(default=0, ge=0)


def _one_line(reason: str) -> str:
    return " ".join(reason.split())[:MAX_REASON]


#: What a dead letter leaves for its own headers (reason, origin...) under the server's
#: `max_payload`, and the most of the original's headers it copies.
_OWN_HEADERS_BYTES = 4 * 1024
_COPIED_HEADERS_BYTES = 16 * 1024


def _size(headers: Mapping[str, str]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.items())


def bounded(
    data: bytes, headers: Mapping[str, str] | None, max_payload: int
) -> tuple[bytes, dict[str, str]]:
    """The body and original headers a dead letter can carry within `max_payload`: all
    of them when they fit; otherwise the headers are dropped first, then the body is cut,
    and the letter says so, with the original's size and sha256 (`dlq show` prints
    them), so that the message is kept by what is left of it and a digest."""
    copied = republishable_headers(headers)
    if headers and "Nats-Msg-Id" in headers:
        copied[H_MSG_ID] = headers["Nats-Msg-Id"][:256]
    notes: dict[str, str] = {}
    if _size(copied) > _COPIED_HEADERS_BYTES:
        notes[H_HEADERS_DROPPED] = str(len(copied))
        copied = {}
    room = max_payload - _OWN_HEADERS_BYTES - _size(copied)
    if len(data) > room:
        notes[H_TRUNCATED] = str(len(data))
        notes[H_SHA256] = hashlib.sha256(data).hexdigest()
        data = data[: max(0, room)]
    return data, {**copied, **notes}


async def dead_letter(
    js: JetStreamContext,
    origin: Origin,
    data: bytes,
    headers: Mapping[str, str] | None,
    reason: str,
) -> None:
    """Keep a message on `sandbox.dlq.<consumer>` with why; once per origin. Never over
    the server's `max_payload`, which would close the connection (see `bounded`)."""
    log.error(
        "%s: %s seq %d moved to %s.%s: %s",
        origin.consumer,
        origin.stream,
        origin.seq,
        DLQ_SUBJECT_PREFIX,
        origin.consumer,
        _one_line(reason),
    )
    observe.DEAD_LETTERS.labels(origin.consumer).inc()
    body, kept = bounded(data, headers, connection_of(js).max_payload)
    await js.publish(
        f"{DLQ_SUBJECT_PREFIX}.{origin.consumer}",
        body,
        headers={
            **kept,
            "Nats-Msg-Id": f"dlq.{origin.consumer}.{origin.stream}.{origin.seq}",
            H_REASON: _one_line(reason),
            H_STREAM: origin.stream[:256],
            H_SEQ: str(origin.seq),
            H_SUBJECT: origin.subject[:256],
            H_CONSUMER: origin.consumer[:256],
            H_DELIVERIES: str(origin.deliveries),
            H_AT: utcnow().isoformat(),
        },
    )


def _parse(seq: int, data: bytes, headers: Mapping[str, str]) -> DeadLetter:
    at = headers.get(H_AT)
    return DeadLetter(
        id=seq,
        origin=Origin(
            stream=headers.get(H_STREAM, "?"),
            seq=int(headers.get(H_SEQ, "0")),
            subject=headers.get(H_SUBJECT, "?"),
            consumer=headers.get(H_CONSUMER, "?"),
            deliveries=int(headers.get(H_DELIVERIES, "0")),
        ),
        reason=headers.get(H_REASON, ""),
        at=datetime.fromisoformat(at) if at else None,
        data=data,
        headers=dict(headers),
    )


async def list_dead_letters(js: JetStreamContext, consumer: str | None = None) -> list[DeadLetter]:
    """Every kept message (of one consumer), oldest first."""
    subject = f"{DLQ_SUBJECT_PREFIX}.{consumer or '*'}"
    return [
        _parse(m.seq, m.data, m.headers)
        async for m in stored_messages(js, DEAD_LETTER_STREAM, subject)
    ]


async def get_dead_letter(js: JetStreamContext, letter_id: int) -> DeadLetter | None:
    try:
        raw = await js.get_msg(DEAD_LETTER_STREAM, letter_id)
    except NotFoundError:
        return None
    if not (raw.subject or "").startswith(f"{DLQ_SUBJECT_PREFIX}."):
        return None
    return _parse(letter_id, raw.data or b"", raw.headers or {})


async def retry_dead_letter(
    js: JetStreamContext, letter: DeadLetter, body: bytes | None = None
) -> int:
    """Publish the message (or its fixed `body`) again on its subject, then forget the
    dead letter. Returns the new message's stream sequence. A letter whose original was
    cut to fit needs the fixed `body`: ValueError otherwise."""
    if body is None and H_TRUNCATED in letter.headers:
        raise ValueError(
            f"dead letter {letter.id} keeps only part of its {letter.headers[H_TRUNCATED]}-byte "
            "original; give the body to send with --body"
        )
    ack = await js.publish(
        letter.origin.subject,
        letter.data if body is None else body,
        headers={**republishable_headers(letter.original_headers), H_RETRY: f"dlq/{letter.id}"},
    )
    await js.delete_msg(DEAD_LETTER_STREAM, letter.id)
    log.warning(
        "dead letter %d (%s seq %d) retried as %s seq %d%s",
        letter.id,
        letter.origin.stream,
        letter.origin.seq,
        ack.stream,
        ack.seq,
        " with a fixed body" if body is not None else "",
    )
    return ack.seq


async def drop_dead_letter(js: JetStreamContext, letter: DeadLetter) -> None:
    """Forget a dead letter for good (logged)."""
    await js.delete_msg(DEAD_LETTER_STREAM, letter.id)
    log.warning(
        "dead letter %d (%s seq %d on %s: %s) dropped",
        letter.id,
        letter.origin.stream,
        letter.origin.seq,
        letter.origin.subject,
        letter.reason,
    )


async def on_max_deliveries(js: JetStreamContext, data: bytes, streams: set[str]) -> None:
    """Turn one `MAX_DELIVERIES` advisory of one of `streams` into a dead letter."""
    try:
        advisory = _Advisory.model_validate_json(data)
    except ValidationError as exc:
        log.error("not a max-deliveries advisory, ignored: %s", validation_problems(exc))
        return
    stream, seq = advisory.stream, advisory.stream_seq
    if stream not in streams or not seq:
        return
    try:
        raw = await js.get_msg(stream, seq)
    except NotFoundError:
        log.error("%s seq %d reached max deliveries but is gone from the stream", stream, seq)
        return
    origin = Origin(
        stream,
        seq,
        raw.subject or "?",
        advisory.consumer,
        advisory.deliveries,
    )
    reason = (
        f"delivered {origin.deliveries} times without an answer "
        "(the consumer's max_deliver; did the worker crash on it?)"
    )
    await dead_letter(js, origin, raw.data or b"", raw.headers, reason)
