"""Where everything lives in JetStream: subjects, streams, KV buckets, consumers.

All state is here (SPEC guarantee 6): workers keep none, so any number of them can
share the durable consumers, and a NATS cluster with replicated streams scales it out.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, replace
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

#: Requests: the plain subjects are for trusted publishers (an operator, the TTL
#: schedule, a deployment's one trusted upstream); an upstream consumer publishes on
#: `<subject>.<its name>`, which nats-server lets only its identity use.
PROVISION_SUBJECT = "sandbox.provision"
DESTROY_SUBJECT = "sandbox.destroy"
EXTEND_SUBJECT = "sandbox.extend"
#: Credentials are asked for by core-NATS request on `sandbox.connect.<owner>.<id>`:
#: no stream may ever take these subjects (the replies carry secrets).
CONNECT_SUBJECT_PREFIX = "sandbox.connect"
STATUS_SUBJECT_PREFIX = "sandbox.status"
METER_SUBJECT_PREFIX = "sandbox.meter"
#: One subject per sandbox holds its TTL destroy until nats-server fires it.
SCHEDULE_SUBJECT_PREFIX = "sandbox.schedule"

REQUESTS_STREAM = "SANDBOX_REQUESTS"
STATUS_STREAM = "SANDBOX_STATUS"
METER_STREAM = "SANDBOX_METER"

STATUS_BUCKET = "sandboxer-status"

#: The credits journal: one subject per entry, `credits.ledger.<tenant>.<kind>.<entry_id>`
#: (the kind is a token of its own so that permissions can say who writes which).
LEDGER_STREAM = "CREDITS_LEDGER"
LEDGER_SUBJECT_PREFIX = "credits.ledger"
#: Each tenant's checkpoints, one subject per tenant, every one kept (the chain).
CHECKPOINT_STREAM = "CREDITS_CHECKPOINTS"
CHECKPOINT_SUBJECT_PREFIX = "credits.checkpoint"

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
#: The stub cloud's own sandboxes (adapters/saas_stub.py): not sandboxer's state.
STUB_BUCKET = "sandboxer-stub"
#: Leases that let one process of many do a periodic job (reconciliation).
LEASE_BUCKET = "sandboxer-leases"
#: Operators' overrides of a tenant's limits, `tenant.<tenant>`, with their history.
POLICY_BUCKET = "sandboxer-policy"
POLICY_HISTORY = 64
#: Template builds (docs/templates.md): requests, and progress events kept beside them.
TEMPLATE_STREAM = "TEMPLATES"
TEMPLATE_BUILD_SUBJECT = "template.build"
TEMPLATE_STATUS_PREFIX = "template.status"
TEMPLATE_CONSUMER = "templates-build"
#: The catalogue: one TemplateRecord per `<name>.<version>`, with its history.
TEMPLATE_BUCKET = "sandboxer-templates"
TEMPLATE_HISTORY = 16
BILLING_CONSUMER = "billing-meter"
EXPORT_CONSUMER = "finhub-export"

PROVISION_CONSUMER = "provisioner-provision"
DESTROY_CONSUMER = "provisioner-destroy"
EXTEND_CONSUMER = "provisioner-extend"
#: The queue group of the workers answering connect requests.
CONNECT_QUEUE = "sandboxer-connect"

DAY_S = 24 * 3600.0
#: Requests are kept a week so operators can replay them; status history and meter
#: events a month, so billing can be rebuilt after an outage.
REQUESTS_MAX_AGE_S = 7 * DAY_S
EVENTS_MAX_AGE_S = 30 * DAY_S
#: A status untouched this long expires (a live sandbox's changes at least every 7
#: days, its longest TTL): longer than any stream a replay reads from.
STATUS_RETENTION_S = 35 * DAY_S
#: Billing marks outlive the meter events and usage records they stop replays of.
MARKER_RETENTION_S = 60 * DAY_S

KIB, MIB, GIB = 1024, 1024**2, 1024**3
#: The largest message each input stream takes (the server refuses a larger publish):
#: a ProvisionRequest is at most about 6 KiB, a meter event or a status about 2 KiB.
MAX_REQUEST_BYTES = 64 * KIB
MAX_EVENT_BYTES = 64 * KIB
MAX_LEDGER_ENTRY_BYTES = 8 * KIB
#: A checkpoint of a tenant with thousands of open holds (a larger one is not written).
MAX_CHECKPOINT_BYTES = 768 * KIB
MAX_USAGE_RECORD_BYTES = 16 * KIB


def provision_subject(consumer: str | None = None) -> str:
    """Where `consumer` publishes provisions (None: the trusted plain subject)."""
    return PROVISION_SUBJECT if consumer is None else f"{PROVISION_SUBJECT}.{consumer}"


def destroy_subject(consumer: str | None = None) -> str:
    """Where `consumer` publishes destroys (None: the trusted plain subject)."""
    return DESTROY_SUBJECT if consumer is None else f"{DESTROY_SUBJECT}.{consumer}"


def extend_subject(consumer: str | None = None) -> str:
    """Where `consumer` publishes TTL extensions (None: the trusted plain subject)."""
    return EXTEND_SUBJECT if consumer is None else f"{EXTEND_SUBJECT}.{consumer}"


def connect_subject(owner: str, sandbox_id: str) -> str:
    """Where the owner of a sandbox asks for its credentials."""
    return f"{CONNECT_SUBJECT_PREFIX}.{owner}.{sandbox_id}"


def consumer_of(subject: str) -> str | None:
    """The consumer a request subject belongs to (`sandbox.provision.<name>`), or None
    for a plain subject. nats-server's permissions guarantee it is the publisher's."""
    for plain in (PROVISION_SUBJECT, DESTROY_SUBJECT, EXTEND_SUBJECT):
        if subject.startswith(f"{plain}."):
            return subject[len(plain) + 1 :]
    return None


def status_subject(owner: str, sandbox_id: str) -> str:
    """Where a sandbox's statuses are announced: under its owner (a consumer's name, or
    `default`), which only that consumer may subscribe to."""
    return f"{STATUS_SUBJECT_PREFIX}.{owner}.{sandbox_id}"


def status_key(owner: str, sandbox_id: str) -> str:
    """A sandbox's key in the status bucket (republished as its status subject)."""
    return f"{owner}.{sandbox_id}"


def template_status_subject(name: str) -> str:
    """Where a template's build progress is told."""
    return f"{TEMPLATE_STATUS_PREFIX}.{name}"


def meter_subject(extension_id: str) -> str:
    return f"{METER_SUBJECT_PREFIX}.{extension_id}"


def schedule_subject(sandbox_id: str) -> str:
    return f"{SCHEDULE_SUBJECT_PREFIX}.{sandbox_id}"


def ledger_subject(tenant: str, kind: str, entry_id: str) -> str:
    """The subject of one journal entry."""
    return f"{LEDGER_SUBJECT_PREFIX}.{tenant}.{kind}.{entry_id}"


def checkpoint_subject(tenant: str) -> str:
    """Where a tenant's journal checkpoints go."""
    return f"{CHECKPOINT_SUBJECT_PREFIX}.{tenant}"


def tenant_ledger(tenant: str) -> str:
    """The subjects of a tenant's whole journal."""
    return f"{LEDGER_SUBJECT_PREFIX}.{tenant}.>"


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

    # Streams that hold money (meter events until billed, the journal, usage records
    # until exported) have no size bound; the others do. A full dead-letter stream
    # refuses new letters (the message stays where it was, and is retried); a full
    # request stream drops its oldest requests, long since handled (message schedules
    # rule out refusing new ones there), which shortens the window of replays.
    return [
        stream(
            REQUESTS_STREAM,
            [
                PROVISION_SUBJECT,
                f"{PROVISION_SUBJECT}.*",
                DESTROY_SUBJECT,
                f"{DESTROY_SUBJECT}.*",
                EXTEND_SUBJECT,
                f"{EXTEND_SUBJECT}.*",
                f"{SCHEDULE_SUBJECT_PREFIX}.*",
            ],
            max_age=REQUESTS_MAX_AGE_S,
            max_msg_size=MAX_REQUEST_BYTES,
            max_bytes=GIB,
            # nats-server >= 2.12 fires `Nats-Schedule` messages onto `sandbox.destroy`.
            allow_msg_schedules=True,
        ),
        stream(
            STATUS_STREAM,
            [f"{STATUS_SUBJECT_PREFIX}.>"],
            max_age=EVENTS_MAX_AGE_S,
            max_msg_size=MAX_EVENT_BYTES,
            max_bytes=GIB,
        ),
        stream(
            METER_STREAM,
            [f"{METER_SUBJECT_PREFIX}.>"],
            max_age=EVENTS_MAX_AGE_S,
            max_msg_size=MAX_EVENT_BYTES,
        ),
        stream(
            LEDGER_STREAM,
            [f"{LEDGER_SUBJECT_PREFIX}.>"],
            # Each entry id is a subject that takes one message, ever: an entry written
            # twice, even years apart, is refused by the server (error 10077).
            max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
            allow_direct=True,
            max_msg_size=MAX_LEDGER_ENTRY_BYTES,
            # Appends that queue behind one another are written as one batch, all or
            # nothing (nats-server >= 2.12; sandboxer/credits.py).
            allow_atomic=True,
        ),
        stream(
            CHECKPOINT_STREAM,
            [f"{CHECKPOINT_SUBJECT_PREFIX}.*"],
            # Never trimmed: verify walks the whole chain.
            allow_direct=True,
            max_msg_size=MAX_CHECKPOINT_BYTES,
        ),
        stream(
            BILLING_STREAM,
            [USAGE_SUBJECT],
            max_age=EVENTS_MAX_AGE_S,
            max_msg_size=MAX_USAGE_RECORD_BYTES,
            # Usage records are deduplicated by Nats-Msg-Id over a day, far longer than
            # any crash-and-redeliver; later replays are stopped by a durable marker.
            duplicate_window=DAY_S,
        ),
        stream(
            DEAD_LETTER_STREAM,
            [f"{DLQ_SUBJECT_PREFIX}.*"],
            max_age=EVENTS_MAX_AGE_S,
            max_bytes=GIB,
            discard=DiscardPolicy.NEW,
            duplicate_window=DAY_S,
        ),
        stream(
            TEMPLATE_STREAM,
            [TEMPLATE_BUILD_SUBJECT, f"{TEMPLATE_STATUS_PREFIX}.*"],
            max_age=EVENTS_MAX_AGE_S,
            max_msg_size=MAX_EVENT_BYTES,
            max_bytes=256 * MIB,
        ),
        stream(
            ADVISORY_STREAM,
            [f"{MAX_DELIVERIES_ADVISORIES}.>"],
            max_age=REQUESTS_MAX_AGE_S,
            max_msg_size=MAX_EVENT_BYTES,
            max_bytes=256 * MIB,
        ),
    ]


def status_bucket_config(replicas: int) -> KeyValueConfig:
    """Latest SandboxStatus per sandbox, keyed `<owner>.<sandbox_id>`. Every write is
    republished by the server on `sandbox.status.<owner>.<sandbox_id>` (and so lands in
    SANDBOX_STATUS): one write stores and announces a state change. A status untouched
    for `STATUS_RETENTION_S` expires."""
    return KeyValueConfig(
        bucket=STATUS_BUCKET,
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
        ttl=STATUS_RETENTION_S,
        max_bytes=4 * GIB,
        max_value_size=MAX_EVENT_BYTES,
        direct=True,
        republish=RePublish(src=f"$KV.{STATUS_BUCKET}.>", dest=f"{STATUS_SUBJECT_PREFIX}.>"),
    )


class TopologyMissing(RuntimeError):
    """Streams or buckets of sandboxer are not on the server: no worker has run there
    yet (only the service creates or changes them)."""

    def __init__(self, missing: list[str]) -> None:
        super().__init__(f"missing: {', '.join(missing)}")
        self.missing = missing


def topology_names() -> list[str]:
    """Every stream sandboxer needs, buckets included (`KV_<bucket>`)."""
    buckets = (STATUS_BUCKET, BILLING_BUCKET, LEASE_BUCKET, POLICY_BUCKET, TEMPLATE_BUCKET)
    return [c.name for c in stream_configs(1) if c.name] + [f"KV_{b}" for b in buckets]


async def require_topology(js: JetStreamContext) -> None:
    """Raise `TopologyMissing` unless every stream and bucket is there; never creates or
    changes one (a CLI must not reset a cluster's replicas, say)."""
    present = {info.config.name for info in await js.streams_info()}
    missing = [name for name in topology_names() if name not in present]
    if missing:
        raise TopologyMissing(missing)


async def ensure_topology(js: JetStreamContext, *, replicas: int = 1) -> None:
    """Create or update every stream and bucket; safe to run from many processes. Only
    the service (workers, billing, the exporter, `sandboxer dev`) calls it."""
    for config in stream_configs(replicas):
        try:
            await js.add_stream(config)
        except BadRequestError:
            await js.update_stream(config)
    await ensure_bucket(js, status_bucket_config(replicas))
    for bucket, ttl in ((BILLING_BUCKET, MARKER_RETENTION_S), (LEASE_BUCKET, None)):
        kv = KeyValueConfig(bucket=bucket, storage=StorageType.FILE, replicas=replicas, ttl=ttl)
        await ensure_bucket(js, kv)
    await ensure_bucket(js, policy_bucket_config(replicas))
    await ensure_bucket(js, template_bucket_config(replicas))


def template_bucket_config(replicas: int) -> KeyValueConfig:
    """The template catalogue; its history shows how a version got where it is."""
    return _bucket_with_history(TEMPLATE_BUCKET, TEMPLATE_HISTORY, MAX_EVENT_BYTES, replicas)


def policy_bucket_config(replicas: int) -> KeyValueConfig:
    """Operators' overrides of tenants' limits; the history is the audit trail (each
    value says who set it, when and why)."""
    return _bucket_with_history(POLICY_BUCKET, POLICY_HISTORY, MAX_LEDGER_ENTRY_BYTES, replicas)


def _bucket_with_history(
    bucket: str, history: int, max_value_size: int, replicas: int
) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=bucket,
        history=history,
        storage=StorageType.FILE,
        replicas=replicas,
        max_value_size=max_value_size,
        direct=True,
    )


async def ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """The bucket of `config`, created if missing; an existing one gets its limits
    (retention, size bounds) brought in line."""
    try:
        bucket = await js.key_value(config.bucket)
    except NotFoundError:
        return await js.create_key_value(config)
    stream = await js.stream_info(f"KV_{config.bucket}")
    wanted: dict[str, Any] = {
        "max_age": config.ttl or 0.0,
        "max_bytes": config.max_bytes or -1,
        "max_msg_size": config.max_value_size or -1,
        "allow_direct": bool(config.direct),
    }
    current = stream.config
    found = {
        "max_age": current.max_age or 0.0,
        "max_bytes": current.max_bytes or -1,
        "max_msg_size": current.max_msg_size or -1,
        "allow_direct": bool(current.allow_direct),
    }
    if found != wanted:
        await js.update_stream(replace(current, **wanted))
    return bucket


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
