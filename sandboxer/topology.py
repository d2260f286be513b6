"""Where everything lives in JetStream: subjects, streams, KV buckets, consumers.

All state is here (SPEC guarantee 6): workers keep none, so any number of them can
share the durable consumers, and a NATS cluster with replicated streams scales it out.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RePublish,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError
from nats.js.kv import KeyValue

PROVISION_SUBJECT = "sandbox.provision"
DESTROY_SUBJECT = "sandbox.destroy"
STATUS_SUBJECT_PREFIX = "sandbox.status"
METER_SUBJECT_PREFIX = "sandbox.meter"
#: One subject per sandbox holds its TTL destroy until nats-server fires it.
SCHEDULE_SUBJECT_PREFIX = "sandbox.schedule"

REQUESTS_STREAM = "SANDBOX_REQUESTS"
STATUS_STREAM = "SANDBOX_STATUS"
METER_STREAM = "SANDBOX_METER"

STATUS_BUCKET = "sandboxer-status"

#: The credits journal: one subject per entry, `credits.ledger.<tenant>.<entry_id>`.
LEDGER_STREAM = "CREDITS_LEDGER"
LEDGER_SUBJECT_PREFIX = "credits.ledger"

BILLING_STREAM = "BILLING"
USAGE_SUBJECT = "billing.usage"

#: Messages a consumer gave up on, kept with why: `sandbox.dlq.<consumer>`.
DEAD_LETTER_STREAM = "DEAD_LETTERS"
DLQ_SUBJECT_PREFIX = "sandbox.dlq"
#: nats-server's word that a consumer reached `max_deliver` on a message.
ADVISORY_STREAM = "ADVISORIES"
MAX_DELIVERIES_ADVISORIES = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"
ADVISORY_CONSUMER = "dead-letter-advisories"
#: Durable markers of the billing consumers (usage published, record exported).
BILLING_BUCKET = "sandboxer-billing"
#: Leases that let one process of many do a periodic job (reconciliation).
LEASE_BUCKET = "sandboxer-leases"
BILLING_CONSUMER = "billing-meter"
EXPORT_CONSUMER = "finhub-export"

PROVISION_CONSUMER = "provisioner-provision"
DESTROY_CONSUMER = "provisioner-destroy"

DAY_S = 24 * 3600.0
#: Requests are kept a week so operators can replay them; status history and meter
#: events a month, so billing can be rebuilt after an outage.
REQUESTS_MAX_AGE_S = 7 * DAY_S
EVENTS_MAX_AGE_S = 30 * DAY_S


def status_subject(sandbox_id: str) -> str:
    return f"{STATUS_SUBJECT_PREFIX}.{sandbox_id}"


def meter_subject(extension_id: str) -> str:
    return f"{METER_SUBJECT_PREFIX}.{extension_id}"


def schedule_subject(sandbox_id: str) -> str:
    return f"{SCHEDULE_SUBJECT_PREFIX}.{sandbox_id}"


def ledger_subject(tenant: str, entry_id: str = "*") -> str:
    return f"{LEDGER_SUBJECT_PREFIX}.{tenant}.{entry_id}"


def republishable_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A stored message's headers fit to go on a new message: without the `Nats-*`
    ones, which are the server's (an old `Nats-Msg-Id` would make the stream drop the
    copy as a duplicate; schedule headers would schedule it again)."""
    return {k: v for k, v in (headers or {}).items() if not k.startswith("Nats-")}


def stream_configs(replicas: int) -> list[StreamConfig]:
    """The streams sandboxer needs, file-backed, with `replicas` copies."""

    def stream(name: str, subjects: list[str], **options: Any) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=subjects,
            storage=StorageType.FILE,
            num_replicas=replicas,
            **options,
        )

    return [
        stream(
            REQUESTS_STREAM,
            [PROVISION_SUBJECT, DESTROY_SUBJECT, f"{SCHEDULE_SUBJECT_PREFIX}.*"],
            max_age=REQUESTS_MAX_AGE_S,
            # nats-server >= 2.12 fires `Nats-Schedule` messages onto `sandbox.destroy`.
            allow_msg_schedules=True,
        ),
        stream(STATUS_STREAM, [f"{STATUS_SUBJECT_PREFIX}.*"], max_age=EVENTS_MAX_AGE_S),
        stream(METER_STREAM, [f"{METER_SUBJECT_PREFIX}.>"], max_age=EVENTS_MAX_AGE_S),
        stream(
            LEDGER_STREAM,
            [f"{LEDGER_SUBJECT_PREFIX}.>"],
            # Each entry id is a subject that takes one message, ever: an entry written
            # twice, even years apart, is refused by the server (error 10077).
            max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            allow_direct=True,
        ),
        stream(
            BILLING_STREAM,
            [USAGE_SUBJECT],
            max_age=EVENTS_MAX_AGE_S,
            # Usage records are deduplicated by Nats-Msg-Id over a day, far longer than
            # any crash-and-redeliver; later replays are stopped by a durable marker.
            duplicate_window=DAY_S,
        ),
        stream(
            DEAD_LETTER_STREAM,
            [f"{DLQ_SUBJECT_PREFIX}.*"],
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=DAY_S,
        ),
        stream(
            ADVISORY_STREAM,
            [f"{MAX_DELIVERIES_ADVISORIES}.>"],
            max_age=REQUESTS_MAX_AGE_S,
        ),
    ]


def status_bucket_config(replicas: int) -> KeyValueConfig:
    """Latest SandboxStatus per sandbox. Every write is republished by the server on
    `sandbox.status.<id>` (and so lands in SANDBOX_STATUS): one write stores and
    announces a state change."""
    return KeyValueConfig(
        bucket=STATUS_BUCKET,
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
        republish=RePublish(src=f"$KV.{STATUS_BUCKET}.>", dest=f"{STATUS_SUBJECT_PREFIX}.>"),
    )


async def ensure_topology(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create or update every stream and bucket; safe to run from many processes."""
    for config in stream_configs(replicas):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    await ensure_bucket(js, status_bucket_config(replicas))
    await ensure_bucket(
        js, KeyValueConfig(bucket=BILLING_BUCKET, storage=StorageType.FILE, replicas=replicas)
    )
    await ensure_bucket(
        js, KeyValueConfig(bucket=LEASE_BUCKET, storage=StorageType.FILE, replicas=replicas)
    )


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket of `config`, created if missing."""
    try:
        return await js.key_value(config.bucket)
    except NotFoundError:
        return await js.create_key_value(config)


async def kv_entries(
    js: JetStreamContext, bucket: str, keys: str = ">"
) -> AsyncIterator[tuple[str, bytes]]:
    """Every live (key, value) of a bucket matching `keys`, read in one pass.

    Not `KeyValue.watch`/`keys()` of nats-py: their end-of-initial-values marker races
    with the push consumer under load and can end the listing early (or empty)."""
    prefix = f"$KV.{bucket}."
    async for message in stored_messages(
        js, f"KV_{bucket}", f"{prefix}{keys}", last_per_subject=True
    ):
        if message.headers.get("KV-Operation") in ("DEL", "PURGE"):
            continue
        yield message.subject[len(prefix) :], message.data


async def read_subject(
    js: JetStreamContext, stream: str, subject: str
) -> AsyncIterator[tuple[int, str, bytes]]:
    """Every stored (sequence, subject, data) of `stream` matching `subject`, oldest
    first, read with a short-lived pull consumer; returns at once when there is none."""
    async for message in stored_messages(js, stream, subject):
        yield message.seq, message.subject, message.data


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as a stream keeps it; `left` is how many of the read come after it."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    at: datetime
    left: int


async def stored_messages(
    js: JetStreamContext,
    stream: str,
    subject: str,
    *,
    last_per_subject: bool = False,
    from_seq: int | None = None,
    since: datetime | None = None,
) -> AsyncGenerator[StoredMessage, None]:
    """The stored messages of `stream` matching `subject`, oldest first: all, the last
    of each subject, or from a sequence or a time on."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,  # a read, not a delivery to account for
        inactive_threshold=10.0,
    )
    if from_seq is not None:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, from_seq
    elif since is not None:
        config.deliver_policy, config.opt_start_time = DeliverPolicy.BY_START_TIME, since
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    try:
        # A pull consumer delivers nothing before it is asked, so the pending count
        # read first is exact: no end-of-data guessing.
        left = (await sub.consumer_info()).num_pending or 0
        while left > 0:
            for message in await sub.fetch(min(512, left), timeout=10.0):
                left -= 1
                meta = message.metadata
                yield StoredMessage(
                    meta.sequence.stream,
                    message.subject,
                    message.data,
                    dict(message.headers or {}),
                    meta.timestamp,
                    left,
                )
    finally:
        await sub.unsubscribe()
