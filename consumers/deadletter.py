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

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

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
        }


def _one_line(reason: str) -> str:
    return " ".join(reason.split())[:MAX_REASON]


async def dead_letter(
    js: JetStreamContext,
    origin: Origin,
    data: bytes,
    headers: Mapping[str, str] | None,
    reason: str,
) -> None:
    """Keep a message on `sandbox.dlq.<consumer>` with why; once per origin."""
    log.error(
        "%s: %s seq %d moved to %s.%s: %s",
        origin.consumer,
        origin.stream,
        origin.seq,
        DLQ_SUBJECT_PREFIX,
        origin.consumer,
        _one_line(reason),
    )
    await js.publish(
        f"{DLQ_SUBJECT_PREFIX}.{origin.consumer}",
        data,
        headers={
            **republishable_headers(headers),
            "Nats-Msg-Id": f"dlq.{origin.consumer}.{origin.stream}.{origin.seq}",
            H_REASON: _one_line(reason),
            H_STREAM: origin.stream,
            H_SEQ: str(origin.seq),
            H_SUBJECT: origin.subject,
            H_CONSUMER: origin.consumer,
            H_DELIVERIES: str(origin.deliveries),
            H_AT: utcnow().isoformat(),
            **({H_MSG_ID: headers["Nats-Msg-Id"]} if headers and "Nats-Msg-Id" in headers else {}),
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
    dead letter. Returns the new message's stream sequence."""
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
    advisory = json.loads(data)
    stream, seq = advisory.get("stream"), int(advisory.get("stream_seq") or 0)
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
        str(advisory.get("consumer", "?")),
        int(advisory.get("deliveries") or 0),
    )
    reason = (
        f"delivered {origin.deliveries} times without an answer "
        "(the consumer's max_deliver; did the worker crash on it?)"
    )
    await dead_letter(js, origin, raw.data or b"", raw.headers, reason)
