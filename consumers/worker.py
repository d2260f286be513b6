"""The provisioner as a FastStream app: durable pull consumers on `sandbox.provision` and
`sandbox.destroy`, each running up to `max_in_flight` handlers at once."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import nats
from faststream import AckPolicy
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub
from faststream.nats.message import NatsMessage
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import DeliverPolicy

from adapters.base import AdapterContext, SandboxAdapter
from consumers.delivery import Delivery, InFlight, KeepAlive
from consumers.provisioner import Provisioner
from sandboxer.credits import Ledger
from sandboxer.registry import Registry
from sandboxer.routing import Router
from sandboxer.settings import Settings
from sandboxer.state import StatusStore
from sandboxer.topology import (
    DESTROY_CONSUMER,
    DESTROY_SUBJECT,
    PROVISION_CONSUMER,
    PROVISION_SUBJECT,
    REQUESTS_STREAM,
    ensure_topology,
)

log = logging.getLogger("sandboxer.worker")


class _FastStreamDelivery:
    """A FastStream NatsMessage seen as a `Delivery`."""

    __slots__ = ("_message",)

    def __init__(self, message: NatsMessage) -> None:
        self._message = message

    @property
    def attempt(self) -> int:
        return int(self._message.raw_message.metadata.num_delivered or 1)

    async def ack(self) -> None:
        await self._message.ack()

    async def nack(self, delay_s: float) -> None:
        await self._message.nack(delay=delay_s)

    async def term(self) -> None:
        await self._message.reject()

    async def in_progress(self) -> None:
        await self._message.in_progress()


def consumer_configs(settings: Settings) -> list[ConsumerConfig]:
    """The two durable consumers. A crash on the last provision attempt still gets two
    more deliveries before the server gives up (the handler itself fails the request at
    `max_deliver`); destroys wait for provisioning to settle, which is itself bounded, so
    they have no limit."""
    return [
        _consumer_config(PROVISION_CONSUMER, PROVISION_SUBJECT, settings, settings.max_deliver + 2),
        _consumer_config(DESTROY_CONSUMER, DESTROY_SUBJECT, settings, -1),
    ]


async def ensure_consumers(js: JetStreamContext, settings: Settings) -> None:
    """Create or update the durable consumers: FastStream binds to an existing durable
    without applying a changed config, so changes to ack wait or limits go through here."""
    for config in consumer_configs(settings):
        await js.add_consumer(REQUESTS_STREAM, config)


def _consumer_config(
    durable: str, subject: str, settings: Settings, max_deliver: int
) -> ConsumerConfig:
    return ConsumerConfig(
        name=durable,
        durable_name=durable,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=JsAckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=max_deliver,
        # Enough outstanding messages for every worker process to stay busy.
        max_ack_pending=max(1000, settings.max_in_flight * 4),
    )


Handler = Callable[[bytes, Delivery], Coroutine[Any, Any, None]]


def _start_in_background(
    handler: Handler, in_flight: InFlight
) -> Callable[[NatsMessage], Awaitable[None]]:
    async def handle(message: NatsMessage) -> None:
        await in_flight.start(lambda: handler(message.body, _FastStreamDelivery(message)))

    return handle


async def _message_itself(message: NatsMessage) -> NatsMessage:
    # The decoder hands the handler the message itself: the raw bytes stay ours to
    # validate (so malformed JSON gets our error), and no dependency injection runs per
    # message (FastStream resolves `Context` parameters in a thread pool).
    return message


def build_broker(settings: Settings, provisioner: Provisioner, in_flight: InFlight) -> NatsBroker:
    """The FastStream broker with both subscribers, each starting its handlers in
    `in_flight`."""
    # Per-message logging off: the handlers log what matters, at a fraction of the cost.
    broker = NatsBroker(
        settings.nats_url,
        max_reconnect_attempts=-1,
        logger=None,
        apply_types=False,
        # On SIGTERM, in-flight handlers get this long to finish; what is cut off is
        # redelivered after the ack wait, so nothing is lost either way.
        graceful_timeout=settings.drain_timeout_s,
    )
    stream = JStream(REQUESTS_STREAM, declare=False)
    batch = min(settings.max_in_flight, 128)

    handlers: dict[str, Handler] = {
        PROVISION_CONSUMER: provisioner.on_provision,
        DESTROY_CONSUMER: provisioner.on_destroy,
    }
    for config in consumer_configs(settings):
        assert config.durable_name is not None and config.filter_subject is not None
        broker.subscriber(
            config.filter_subject,
            stream=stream,
            durable=config.durable_name,
            pull_sub=PullSub(batch_size=batch, timeout=1.0),
            config=config,
            # FastStream's handlers only wait for a slot in `in_flight`; a few suffice.
            max_workers=min(settings.max_in_flight, 64),
            ack_policy=AckPolicy.MANUAL,
            decoder=_message_itself,
        )(_start_in_background(handlers[config.durable_name], in_flight))
    return broker


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the provisioner until `stop` is set (or SIGTERM/SIGINT), then drain.
    `ready` is set once both consumers are pulling."""
    registry = Registry.load(settings.extensions_dir)
    stop = stop or asyncio.Event()
    async with AsyncExitStack() as stack:
        nc = await nats.connect(
            settings.nats_url, max_reconnect_attempts=-1, name="sandboxer-worker"
        )
        stack.push_async_callback(nc.drain)
        js = nc.jetstream(timeout=10.0)
        await ensure_topology(js, replicas=settings.replicas)
        adapters: dict[str, SandboxAdapter] = registry.build_adapters(
            {
                ext_id: AdapterContext(manifest, js, settings.deployment, settings.replicas)
                for ext_id, manifest in registry.extensions.items()
            }
        )
        for adapter in adapters.values():
            stack.push_async_callback(adapter.aclose)
        keepalive = KeepAlive(every_s=max(0.5, settings.ack_wait_s / 3))
        stack.push_async_callback(keepalive.aclose)
        provisioner = Provisioner(
            js=js,
            registry=registry,
            router=Router(adapters),
            statuses=await StatusStore.open(js),
            settings=settings,
            keepalive=keepalive,
            ledger=Ledger(js),
        )
        await ensure_consumers(js, settings)
        # Shutdown runs in reverse: stop fetching, drain handlers, then close the rest.
        in_flight = InFlight(settings.max_in_flight)
        stack.push_async_callback(in_flight.drain, settings.drain_timeout_s)
        broker = build_broker(settings, provisioner, in_flight)
        await broker.start()
        stack.push_async_callback(broker.stop)
        # Everything built so far lives as long as the worker: keep it out of the
        # collector's scans, and collect less often, so that no request waits for a
        # full-heap GC pass (they showed as 40 ms stalls in the p99 of `make bench`).
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # not main thread
                loop.add_signal_handler(sig, stop.set)
        log.info(
            "worker ready: nats=%s deployment=%s extensions=%s in-flight<=%d",
            settings.nats_url, settings.deployment, ",".join(adapters), settings.max_in_flight,
        )  # fmt: skip
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("worker stopping: draining in-flight requests")
