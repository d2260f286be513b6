"""What every sandboxer FastStream app shares: durable pull consumers that we upsert
ourselves, handlers run as small tasks behind a bounded `InFlight`, and a graceful
drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.message import NatsMessage
from faststream.nats.security import (
    NatsCredentials,
    NatsNKey,
    NatsSecurity,
    NatsToken,
    NatsUserPassword,
)
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import DeliverPolicy

from consumers.deadletter import Origin, dead_letter
from consumers.delivery import Delivery, InFlight, KeepAlive
from sandboxer import observe
from sandboxer.connect import Refusals, close_nats, connect_service, tls_context
from sandboxer.settings import NatsAuth, Settings
from sandboxer.topology import ensure_topology

log = logging.getLogger("sandboxer.app")

Handler = Callable[[bytes, Delivery], Coroutine[Any, Any, None]]


#: The delivery bound of consumers whose handlers retry outages without a limit of
#: their own (destroy, billing, export): about a week of deliveries at the 60 s
#: backoff cap. A message that reaches it is kept as a dead letter (through the
#: server's advisory), so that no message can come back forever.
LONG_RETRY_DELIVERIES = 10_000


@dataclass(frozen=True)
class Subscription:
    """One durable pull consumer and the handler of its messages."""

    stream: str
    durable: str
    subjects: tuple[str, ...]
    handler: Handler
    #: Server-side delivery limit: every consumer has one.
    max_deliver: int = LONG_RETRY_DELIVERIES
    #: (consumer, tenant) a message is for, to share the handler slots fairly (None:
    #: its messages wait in one queue, first come first served).
    fair_key: Callable[[str, bytes], tuple[str, str]] | None = None


class _FastStreamDelivery:
    """A FastStream NatsMessage seen as a `Delivery`."""

    __slots__ = ("_js", "_message")

    def __init__(self, message: NatsMessage, js: JetStreamContext) -> None:
        self._message = message
        self._js = js

    @property
    def attempt(self) -> int:
        return int(self._message.raw_message.metadata.num_delivered or 1)

    @property
    def headers(self) -> Mapping[str, str]:
        return self._message.raw_message.headers or {}

    @property
    def subject(self) -> str:
        return self._message.raw_message.subject

    async def ack(self) -> None:
        await self._message.ack()

    async def nack(self, delay_s: float) -> None:
        await self._message.nack(delay=delay_s)

    async def term(self) -> None:
        await self._message.reject()

    async def dead_letter(self, reason: str) -> None:
        raw = self._message.raw_message
        meta = raw.metadata
        origin = Origin(
            meta.stream,
            meta.sequence.stream,
            raw.subject,
            meta.consumer,
            int(meta.num_delivered or 1),
        )
        await dead_letter(self._js, origin, raw.data, raw.headers, reason)
        await self.term()

    async def in_progress(self) -> None:
        await self._message.in_progress()


class ConnectionLost(RuntimeError):
    """A connection of this process was closed for good (the server closed it, or
    reconnecting gave up): the process cannot do its work and must exit, so that its
    supervisor starts it again."""


class Lifeline:
    """Notices a connection closed by anyone but this process itself."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self._stopping = False

    def watch(self, what: str) -> Callable[[], Awaitable[None]]:
        """The `closed_cb` of one connection (and what its refused credentials call)."""

        async def closed() -> None:
            if not self._stopping:
                log.error("%s: its %s to NATS was closed for good; exiting", self.name, what)
                self.lost.set()

        return closed

    def stopping(self) -> None:
        """From now on, closed connections are this process's own doing."""
        self._stopping = True


async def connect(
    settings: Settings, lifeline: Lifeline, stack: AsyncExitStack
) -> JetStreamContext:
    """A JetStream context on a connection that reconnects forever and is drained when
    `stack` closes, with every stream and bucket in place."""
    lost = lifeline.watch("connection")
    nc = await connect_service(settings, lifeline.name, on_closed=lost, on_refused=lost)
    stack.push_async_callback(close_nats, nc)
    stack.callback(lifeline.stopping)  # unwinds first: the close is this process's own
    js = nc.jetstream(timeout=10.0)
    await ensure_topology(js, replicas=settings.replicas)
    return js


def broker_security(auth: NatsAuth) -> NatsSecurity | None:
    """The identity of `auth` as FastStream's broker takes it."""
    context = tls_context(auth)
    if auth.creds_file:
        return NatsCredentials.from_file(auth.creds_file, ssl_context=context)
    if auth.nkey_seed_file:
        return NatsNKey(auth.nkey_seed_file, ssl_context=context)
    if auth.user:
        return NatsUserPassword(auth.user, auth.password or "", ssl_context=context)
    if auth.token:
        return NatsToken(auth.token, ssl_context=context)
    return NatsSecurity(ssl_context=context) if context else None


def consumer_config(subscription: Subscription, settings: Settings) -> ConsumerConfig:
    """The durable consumer of a subscription."""
    return ConsumerConfig(
        name=subscription.durable,
        durable_name=subscription.durable,
        **(
            {"filter_subject": subscription.subjects[0]}
            if len(subscription.subjects) == 1
            else {"filter_subjects": list(subscription.subjects)}
        ),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=subscription.max_deliver,
        # Enough outstanding messages for every process to stay busy; a fairly shared
        # one sees past a tenant's backlog, up to what its queue holds.
        max_ack_pending=max(1000, settings.max_in_flight * 4)
        + (settings.max_queued if subscription.fair_key else 0),
    )


async def ensure_consumers(
    js: JetStreamContext, subscriptions: Sequence[Subscription], settings: Settings
) -> None:
    """Create or update the durable consumers: FastStream binds to an existing durable
    without applying a changed config, so changes to ack wait or limits go through here."""
    for subscription in subscriptions:
        await js.add_consumer(subscription.stream, consumer_config(subscription, settings))


def _start_in_background(
    subscription: Subscription, in_flight: InFlight, js: JetStreamContext
) -> Callable[[NatsMessage], Awaitable[None]]:
    """FastStream's handler of a subscription: it starts the real one as a task (so a
    slow provider call never holds a fetch), or queues it for its consumer and tenant
    when every slot is taken, timed by `InFlight` and, when traced, run in a span
    continuing the message's trace."""
    handler, durable, fair_key = subscription.handler, subscription.durable, subscription.fair_key

    async def handle(message: NatsMessage) -> None:
        delivery = _FastStreamDelivery(message, js)
        body: bytes = message.body
        key = None
        if fair_key is not None and in_flight.busy:  # it will wait: in which queue
            key = partial(fair_key, message.raw_message.subject, body)
        if observe.tracing():
            await in_flight.start(
                lambda: observe.traced(delivery, durable, handler(body, delivery)),
                durable,
                key=key,
                delivery=delivery,
            )
        else:
            await in_flight.start(
                lambda: handler(body, delivery), durable, key=key, delivery=delivery
            )

    return handle


async def _message_itself(message: NatsMessage) -> NatsMessage:
    # The decoder hands the handler the message itself: the raw bytes stay ours to
    # validate (so malformed JSON gets our error), and no dependency injection runs per
    # message (FastStream resolves `Context` parameters in a thread pool).
    return message


def build_broker(
    settings: Settings,
    subscriptions: Sequence[Subscription],
    in_flight: InFlight,
    js: JetStreamContext,
    lifeline: Lifeline,
) -> NatsBroker:
    """A FastStream broker whose subscribers start their handlers in `in_flight`."""
    # Replies and pulled messages come to this identity's own inboxes (its permissions).
    inbox = settings.nats_auth.inbox_prefix or "_INBOX"
    # Per-message logging off: the handlers log what matters, at a fraction of the cost.
    lost = lifeline.watch("broker connection")
    refusals = Refusals(f"{lifeline.name} broker", lost)
    broker = NatsBroker(
        settings.nats_servers,
        max_reconnect_attempts=-1,
        error_cb=refusals.on_error,
        reconnected_cb=refusals.on_reconnected,
        security=broker_security(settings.nats_auth),
        inbox_prefix=inbox,
        closed_cb=lost,
        logger=None,
        apply_types=False,
        # On SIGTERM, FastStream's handlers get this long; they only start tasks.
        graceful_timeout=settings.drain_timeout_s,
    )
    for subscription in subscriptions:
        broker.subscriber(
            subscription.subjects[0],
            stream=JStream(subscription.stream, declare=False),
            durable=subscription.durable,
            pull_sub=PullSub(batch_size=min(settings.max_in_flight, 128), timeout=1.0),
            config=consumer_config(subscription, settings),
            # FastStream's handler only starts a task in `in_flight` (or queues it), so
            # one at a time suffices: FastStream's concurrent mode spawns an anyio task
            # per message besides ours, which halved (b) (docs/architecture.md).
            max_workers=1,
            ack_policy=AckPolicy.MANUAL,
            decoder=_message_itself,
            inbox_prefix=f"{inbox}.".encode(),  # nats-py adds no dot here
        )(_start_in_background(subscription, in_flight, js))
    return broker


async def serve(
    lifeline: Lifeline,
    js: JetStreamContext,
    subscriptions: Sequence[Subscription],
    settings: Settings,
    stop: asyncio.Event,
    ready: asyncio.Event | None = None,
    weight: Callable[[str], int] | None = None,
) -> None:
    """Consume `subscriptions` until `stop` is set (or SIGTERM/SIGINT), then stop
    fetching and let in-flight handlers finish for up to `drain_timeout_s`; what is cut
    off is redelivered after the ack wait, so nothing is lost either way. A connection
    closed for good ends it with `ConnectionLost`."""
    name = lifeline.name
    await ensure_consumers(js, subscriptions, settings)
    await observe.start(settings, name.removeprefix("sandboxer-"))
    queued_alive = KeepAlive.for_ack_wait(settings)
    in_flight = InFlight(
        settings.max_in_flight,
        max_queued=settings.max_queued,
        keepalive=queued_alive,
        weight=weight,
    )
    observe.HANDLERS_IN_FLIGHT.labels(name).set_function(lambda: len(in_flight))
    broker = build_broker(settings, subscriptions, in_flight, js, lifeline)
    await broker.start()
    try:
        # Everything built so far lives as long as the process: keep it out of the
        # collector's scans, and collect less often, so that no message waits for a
        # full-heap GC pass (they showed as 40 ms stalls in the p99 of `make bench`).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not main thread
                loop.add_signal_handler(sig, stop.set)
        log.info("%s ready: %s", name, ", ".join(", ".join(s.subjects) for s in subscriptions))
        if ready is not None:
            ready.set()
        await _first_of(stop, lifeline.lost)
        log.info("%s stopping: draining in-flight messages", name)
    finally:
        # Stop fetching, let the handlers finish and ack on the still open connection,
        # then close it (closing first would lose the acks: redeliveries, not losses).
        lost = lifeline.lost.is_set()
        lifeline.stopping()
        for subscriber in broker.subscribers:
            await subscriber.stop()
        given = await in_flight.give_back()
        if given:
            log.info("%s: %d queued messages handed back to JetStream", name, given)
        await queued_alive.aclose()
        await in_flight.drain(1.0 if lost else settings.drain_timeout_s)
        await broker.stop()
    if lost:
        raise ConnectionLost(f"{name}: a connection to NATS was closed for good")


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
