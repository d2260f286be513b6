"""What a handler needs of one JetStream delivery, and the decisions it can take.

A handler ends each delivery once: its work runs inside `settle`, which acks when the
work returns, naks when it raises `Retry` or a retryable error, and otherwise records
the failure and acks or dead-letters; the only direct answers are `dead_letter` for a
message that does not validate and `ack` for one with nothing to do (a `started` meter
event, for billing). A single keep-alive loop tells JetStream that long provider calls
are still in progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

import nats.errors
import nats.js.errors
from pydantic import ValidationError

from adapters.shared import backoff_s
from sandboxer import observe
from sandboxer.errors import SandboxerError, validation_problems
from sandboxer.settings import Settings

log = logging.getLogger("sandboxer.delivery")


class Delivery(Protocol):
    """One delivery of a JetStream message."""

    @property
    def attempt(self) -> int:
        """1 on first delivery, then 2, 3, ..."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """The message's headers (empty if it has none)."""
        ...

    @property
    def subject(self) -> str:
        """The subject it was published on (whose permissions say who published it)."""
        ...

    async def ack(self) -> None: ...

    async def nack(self, delay_s: float) -> None: ...

    async def term(self) -> None: ...

    async def dead_letter(self, reason: str) -> None:
        """Keep the message on its consumer's dead-letter subject, then `term` it."""
        ...

    async def in_progress(self) -> None: ...


async def reject_invalid(delivery: Delivery, what: str, exc: ValidationError) -> str:
    """Keep a message that does not validate as a dead letter (retrying cannot fix it),
    with what is wrong; returns that."""
    reason = validation_problems(exc)
    await delivery.dead_letter(f"invalid {what}: {reason}")
    return reason


class Retry(Exception):
    """Deliver this message again after `delay_s` seconds."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


def retry_while_deliveries_remain(delivery: Delivery, settings: Settings, reason: str) -> None:
    """Raise `Retry` (with backoff) unless this was the last delivery `settings` allow:
    for what may only be late (a record another process writes a moment after the
    message), never for what is wrong. Returns when the caller should give up."""
    if delivery.attempt < settings.max_deliver:
        raise Retry(
            backoff_s(
                delivery.attempt, base_s=settings.retry_backoff_s, cap_s=settings.retry_cap_s
            ),
            reason,
        )


#: How long one delivery keeps repeating its work while JetStream is unavailable (a
#: leader election, a reconnect) before the failure counts as a failed delivery.
JETSTREAM_PATIENCE_S = 60.0


def jetstream_unavailable(exc: BaseException) -> bool:
    """True for errors that mean NATS/JetStream itself is briefly out of reach."""
    return isinstance(exc, _UNAVAILABLE)


_UNAVAILABLE = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


async def settle(
    what: str,
    work: Callable[[], Coroutine[Any, Any, None]],
    delivery: Delivery,
    settings: Settings,
    *,
    give_up: Callable[[Exception], Awaitable[None]],
    retry_transient_forever: bool = False,
    rejections_answered: bool = False,
) -> None:
    """Run `work()` and end the delivery with exactly one ack, nak or dead letter.

    While JetStream is unavailable the work is repeated within the delivery (for up to
    `JETSTREAM_PATIENCE_S`, keeping the message alive): every step of a handler is
    idempotent, so a cluster's leader election spends no delivery. `Retry` and
    retryable errors are nak'ed with backoff while attempts remain (up to
    `max_deliver`, or without limit for known transient errors if
    `retry_transient_forever`); anything else is handed to `give_up`, then kept as a
    dead letter. Unexpected errors count as retryable, within `max_deliver`. With
    `rejections_answered`, a non-retryable SandboxerError (`no_route`, a refusal...) is
    the request's answer, recorded by `give_up`: the message is acked, not kept.
    """
    # The outage loop is inlined, not a helper coroutine: with 10,000 handlers waiting
    # on slow providers, one more frame each is megabytes.
    waited, pause = 0.0, 0.25
    try:
        while True:
            try:
                await work()
                break
            except Exception as exc:
                if not jetstream_unavailable(exc) or waited >= JETSTREAM_PATIENCE_S:
                    raise
                log.warning("%s: JetStream unavailable (%s), again in %.2fs", what, exc, pause)
            with contextlib.suppress(Exception):
                await delivery.in_progress()
            await asyncio.sleep(pause)
            waited, pause = waited + pause, min(pause * 2, 4.0)
    except Retry as retry:
        log.info("%s: retry in %.1fs: %s", what, retry.delay_s, retry)
        await delivery.nack(retry.delay_s)
        return
    except Exception as exc:
        known = isinstance(exc, SandboxerError)
        retryable = exc.retryable if isinstance(exc, SandboxerError) else True
        unbounded = known and retry_transient_forever
        if retryable and (unbounded or delivery.attempt < settings.max_deliver):
            delay = backoff_s(
                delivery.attempt, base_s=settings.retry_backoff_s, cap_s=settings.retry_cap_s
            )
            log.warning(
                "%s: attempt %d failed, retry in %.1fs: %s", what, delivery.attempt, delay, exc
            )
            await delivery.nack(delay)
            return
        await give_up(exc)
        if known and not retryable and rejections_answered:
            await delivery.ack()
            return
        tries = f" after {delivery.attempt} deliveries" if retryable else ""
        await delivery.dead_letter(f"{what}: {type(exc).__name__}{tries}: {exc}")
        return
    await delivery.ack()


class KeepAlive:
    """Sends `in_progress` for every registered delivery each `every_s` seconds, from
    one task, so that 10,000 slow provider calls cost one timer, not 10,000."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self._active: set[Delivery] = set()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def for_ack_wait(
        cls, settings: Settings, closed_by: contextlib.AsyncExitStack | None = None
    ) -> KeepAlive:
        """One that speaks three times per ack wait (at most twice a second), stopped
        when `closed_by` closes (if given)."""
        keepalive = cls(every_s=max(0.5, settings.ack_wait_s / 3))
        if closed_by is not None:
            closed_by.push_async_callback(keepalive.aclose)
        return keepalive

    def watch(self, delivery: Delivery) -> _Watched:
        """Keep `delivery` from being redelivered while the `async with` block runs."""
        return _Watched(self, delivery)

    def keep(self, delivery: Delivery) -> None:
        """Keep `delivery` alive until `forget`."""
        self._active.add(delivery)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="sandboxer-keepalive")

    def forget(self, delivery: Delivery) -> None:
        self._active.discard(delivery)

    async def _run(self) -> None:
        while self._active:
            await asyncio.sleep(self.every_s)
            for delivery in list(self._active):
                try:
                    await delivery.in_progress()
                except Exception as exc:  # the ack wait will redeliver; nothing lost
                    log.warning("in_progress failed: %s", exc)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class _Watched:
    """`async with keepalive.watch(delivery)`: a slotted object, not a generator-based
    context manager, because 10,000 slow provider calls each hold one."""

    __slots__ = ("_delivery", "_keepalive")

    def __init__(self, keepalive: KeepAlive, delivery: Delivery) -> None:
        self._keepalive = keepalive
        self._delivery = delivery

    async def __aenter__(self) -> None:
        self._keepalive.keep(self._delivery)

    async def __aexit__(self, *exc: object) -> None:
        self._keepalive.forget(self._delivery)


#: A queued handler: start it, the consumer it is timed under, its delivery.
_Queued = tuple[Callable[[], Coroutine[Any, Any, None]], str, "Delivery | None"]


class InFlight:
    """Runs up to `limit` handlers at once, each as its own small task, and shares the
    slots fairly: what cannot start at once waits in a queue of its own consumer and
    tenant (`key`), and a finished handler's slot goes to the next queue in turn,
    deficit round robin, a consumer's turn as long as its `weight`, its tenants in turn
    within it. So one tenant's backlog never delays another's, whatever order the
    messages came in (docs/policy.md, "Fair scheduling").

    The FastStream handler only queues or starts the task, so what a slow provider call
    keeps alive is this task and the message, not FastStream's whole per-message call
    stack (that halves the memory of 10,000 calls in flight). Queued messages are kept
    alive by `keepalive`; once `max_queued` wait, the FastStream handler blocks, which
    stops the fetching: back-pressure.
    """

    def __init__(
        self,
        limit: int,
        *,
        max_queued: int = 0,
        keepalive: KeepAlive | None = None,
        weight: Callable[[str], int] | None = None,
    ) -> None:
        self.limit = limit
        self.max_queued = max_queued
        self._keepalive = keepalive
        self._weight = weight or (lambda consumer: 1)
        #: Each running handler task (named after its consumer) and when it started.
        self._tasks: dict[asyncio.Task[None], float] = {}
        self._changed = asyncio.Event()
        # The queues: consumers in turn, each with its tenants in turn and their queues.
        self._turns: deque[str] = deque()
        self._lanes: dict[str, tuple[deque[str], dict[str, deque[_Queued]]]] = {}
        self._credit: dict[str, int] = {}
        self.queued = 0

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def busy(self) -> bool:
        """True when a handler started now would have to wait in a queue."""
        return len(self._tasks) >= self.limit or self.queued > 0

    async def start(
        self,
        handler: Callable[[], Coroutine[Any, Any, None]],
        consumer: str = "",
        *,
        key: Callable[[], tuple[str, str]] | None = None,
        delivery: Delivery | None = None,
    ) -> None:
        """Run `handler()` in the background now if a slot is free and nothing waits,
        else queue it under `key()` (the consumer and tenant it is for); wait only when
        the queue is full. Its time goes into `sandboxer_handled_seconds` of `consumer`
        (kept here, not in another object per message in flight: 10,000 of them are a
        benchmark)."""
        while len(self._tasks) >= self.limit and self.queued >= self.max_queued:
            self._changed.clear()
            await self._changed.wait()
        if len(self._tasks) < self.limit and not self.queued:
            self._launch(handler, consumer)
            return
        lane, tenant = key() if key is not None else (consumer, "")
        self._enqueue(lane, tenant, (handler, consumer, delivery))
        if delivery is not None and self._keepalive is not None:
            self._keepalive.keep(delivery)
        while len(self._tasks) < self.limit and self.queued:
            self._launch_next()

    def _launch(self, handler: Callable[[], Coroutine[Any, Any, None]], consumer: str) -> None:
        task = asyncio.create_task(handler(), name=consumer)
        self._tasks[task] = time.perf_counter()
        task.add_done_callback(self._finished)

    def _enqueue(self, lane: str, tenant: str, item: _Queued) -> None:
        if lane not in self._lanes:
            self._lanes[lane] = (deque(), {})
            self._turns.append(lane)
            self._credit[lane] = max(1, self._weight(lane))
        tenants, queues = self._lanes[lane]
        if tenant not in queues:
            queues[tenant] = deque()
            tenants.append(tenant)
        queues[tenant].append(item)
        self.queued += 1

    def _launch_next(self) -> None:
        """Start the head of the next queue in turn."""
        lane = self._turns[0]
        tenants, queues = self._lanes[lane]
        tenant = tenants[0]
        waiting = queues[tenant]
        handler, consumer, delivery = waiting.popleft()
        self.queued -= 1
        if waiting:
            tenants.rotate(-1)
        else:
            tenants.popleft()
            del queues[tenant]
        self._credit[lane] -= 1
        if not tenants:
            self._turns.popleft()
            del self._lanes[lane], self._credit[lane]
        elif self._credit[lane] <= 0:
            self._credit[lane] = max(1, self._weight(lane))
            self._turns.rotate(-1)
        if delivery is not None and self._keepalive is not None:
            self._keepalive.forget(delivery)
        self._launch(handler, consumer)

    def _finished(self, task: asyncio.Task[None]) -> None:
        began = self._tasks.pop(task)
        crashed = not task.cancelled() and task.exception() is not None
        observe.handled_seconds(task.get_name(), "error" if crashed else "ok").observe(
            time.perf_counter() - began
        )
        if crashed:
            # Handlers decide ack/nak/term themselves; reaching here is a bug. The
            # message is redelivered after the ack wait, so nothing is lost.
            log.error("handler crashed", exc_info=task.exception())
        if self.queued:
            self._launch_next()
        self._changed.set()

    async def give_back(self) -> int:
        """Hand every queued message back to JetStream at once (a stopping worker):
        another worker takes it now rather than after the ack wait."""
        given = 0
        while self.queued:
            lane = self._turns[0]
            tenants, queues = self._lanes[lane]
            _, _, delivery = queues[tenants[0]].popleft()
            self.queued -= 1
            if not queues[tenants[0]]:
                del queues[tenants.popleft()]
            if not tenants:
                self._turns.popleft()
                del self._lanes[lane], self._credit[lane]
            if delivery is not None:
                if self._keepalive is not None:
                    self._keepalive.forget(delivery)
                with contextlib.suppress(Exception):
                    await delivery.nack(0.0)
                given += 1
        return given

    async def drain(self, timeout_s: float) -> None:
        """Let running handlers finish for up to `timeout_s`, then cancel the rest
        (their messages are redelivered after the ack wait)."""
        if not self._tasks:
            return
        log.info("draining %d in-flight handlers (up to %.0fs)", len(self._tasks), timeout_s)
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("%d handlers cut off; their messages will be redelivered", len(pending))
