"""What an operator sees of a running sandboxer: Prometheus metrics, OpenTelemetry
traces, and the sandbox a log line is about.

- **Metrics** live on prometheus_client's default registry (with its process
  metrics) and are served on `SANDBOXER_METRICS_ADDR` by `serve_metrics`, on the
  event loop. Counting
  costs a lock and an add; the figures are observability, not accounting: USD counters
  are floats made from the exact `Decimal`s the ledger keeps.
- **Traces** are off (no tracer: nothing is created or injected) unless the standard
  `OTEL_*` variables configure an exporter (`Settings.tracing`). When on, `traced`
  runs each message's handler in a span continuing the trace context of its headers;
  the handler's spans (provider calls, the fin-hub POST) are its children, and every
  message it publishes carries the context on (`trace_headers`): one sandbox's
  requests, meter events, billing and export are one trace.
- **Why not FastStream's middlewares** (its Prometheus and telemetry ones): our
  handlers run as tasks that FastStream's handler only starts (`consumers/app.py`), so
  its middlewares would time and trace that hand-off, not the handling, and report
  every message as processed before it is; and together they cost 13 % of the
  provision pipeline on 2 cores (`make bench` (h), docs/operations.md). We
  time the handler itself (`consumers/delivery.py:InFlight`) and trace it (`traced`)
  for a fraction of that.
- **Log context**: `bind(sandbox_id=…, tenant=…)` in a handler task names the sandbox
  in every line that task logs (`sandboxer.logs`).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import functools
import threading
import time
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from sandboxer.settings import SettingsError

if TYPE_CHECKING:
    import httpx
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from sandboxer.settings import Settings

# -- metrics --------------------------------------------------------------------------

PROVISIONS = Counter(
    "sandboxer_provisions",
    "Provisions settled: ready, failed (stored) or refused (answered, not stored).",
    ["extension_id", "outcome", "error_code"],
)
DESTROYS = Counter(
    "sandboxer_destroys",
    "Destroys settled: destroyed, failed for good, or refused.",
    ["extension_id", "outcome", "error_code"],
)
PROVIDER_CALL_SECONDS = Histogram(
    "sandboxer_provider_call_seconds",
    "Time of one provider call, by extension and call, and whether it raised.",
    ["extension_id", "call", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CREDITS_HELD_USD = Counter("sandboxer_credits_held_usd", "USD newly held for sandboxes' TTLs.")
CREDITS_DEBITED_USD = Counter("sandboxer_credits_debited_usd", "USD debited for what ran.")
HANDLED_SECONDS = Histogram(
    "sandboxer_handled_seconds",
    "Time from a message's handler start to its settling (ack, nak or dead letter), by "
    "durable consumer; `outcome` error: the handler raised.",
    ["consumer", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
HANDLERS_IN_FLIGHT = Gauge(
    "sandboxer_handlers_in_flight", "Message handlers running now.", ["process"]
)
DEAD_LETTERS = Counter(
    "sandboxer_dead_letters", "Messages kept as dead letters, by consumer.", ["consumer"]
)
RECONCILE_ACTIONS = Counter(
    "sandboxer_reconcile_actions",
    "What reconciliation found for each provider sandbox (or extension it could not list).",
    ["extension_id", "action"],
)
FINHUB_EXPORTS = Counter(
    "sandboxer_finhub_exports",
    "POSTs of usage records to fin-hub: delivered, retry (will be sent again), rejected.",
    ["outcome"],
)
FINHUB_EXPORT_LAG_SECONDS = Histogram(
    "sandboxer_finhub_export_lag_seconds",
    "From a sandbox's stop to fin-hub's acceptance of its usage record.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)


def usd(counter: Counter, amount: Decimal) -> None:
    """Add an exact amount to a USD counter (as the float Prometheus keeps)."""
    counter.inc(float(amount))


_serving_on: asyncio.AbstractEventLoop | None = None


async def start(settings: Settings, service: str) -> None:
    """What a service process turns on at start: its metrics endpoint and its traces,
    as `settings` say (once a process: `sandboxer dev` runs two services in one)."""
    setup_tracing(settings, service)
    await serve_metrics(settings)


async def serve_metrics(settings: Settings) -> None:
    """Serve the metrics on `settings.metrics_addr`, if one is set: on the event loop,
    not in a thread of its own (a thread would take the GIL from the handlers)."""
    global _serving_on
    loop = asyncio.get_running_loop()
    if settings.metrics_addr is None or _serving_on is loop:
        return  # not asked for, or served already (claimed before the bind's await)
    _serving_on = loop
    host, port = settings.metrics_addr
    try:
        await asyncio.start_server(_answer_scrape, host, port)
    except OSError as exc:
        _serving_on = None
        raise SettingsError(
            f"SANDBOXER_METRICS_ADDR={host}:{port}: cannot listen there ({exc.strerror})"
        ) from None


async def _answer_scrape(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One scrape: any GET is answered with every metric (as prometheus_client's own
    server does); the request is read for at most 5 s and 8 KiB."""
    try:
        async with asyncio.timeout(5):
            request = await reader.readuntil(b"\r\n\r\n")
        if len(request) > 8192 or not request.startswith(b"GET "):
            status, body, kind = b"400 Bad Request", b"", b"text/plain"
        else:
            status, body, kind = b"200 OK", generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode()
        writer.write(
            b"HTTP/1.1 "
            + status
            + b"\r\nContent-Type: "
            + kind
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass
    finally:
        writer.close()


# -- traces ---------------------------------------------------------------------------

_tracer: trace.Tracer | None = None
#: `opentelemetry.trace` and the W3C propagator, imported once traces are turned on
#: (a service without traces does not load them).
_trace: Any = None
_W3C: Any = None

#: At exit, how long the spans still queued may take to reach the collector. Past it
#: they are dropped: an exporter retries a collector that is down for up to
#: `OTEL_EXPORTER_OTLP_TIMEOUT` (10 s) a batch, and a stopping process must not wait
#: on its traces.
TRACE_FLUSH_S = 2.0


def setup_tracing(settings: Settings, service: str) -> None:
    """Turn traces on if the `OTEL_*` variables ask for them: spans are batched to the
    exporter `OTEL_TRACES_EXPORTER` names (`otlp`, the default, or `console`), sampled
    as `OTEL_TRACES_SAMPLER` says; `OTEL_SERVICE_NAME` defaults to `sandboxer-<service>`."""
    if not settings.tracing or _tracer is not None:
        return
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    resource = Resource({"service.name": f"sandboxer-{service}"}).merge(
        OTELResourceDetector().detect()
    )
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    exporter: SpanExporter
    if settings.trace_exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    atexit.register(_flush_at_exit, provider)
    use_tracer_provider(provider)


def _flush_at_exit(provider: TracerProvider) -> None:
    """Send the queued spans for up to `TRACE_FLUSH_S`, then let the process go (the
    SDK's own exit hook waits for as long as its exporter retries)."""
    flushing = threading.Thread(target=provider.shutdown, name="trace-flush", daemon=True)
    flushing.start()
    flushing.join(TRACE_FLUSH_S)


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace with `provider` from now on (None: traces off). Tests give an in-memory one.
    The context sent on is W3C trace context alone (baggage is the publisher's)."""
    global _tracer, _trace, _W3C
    if provider is not None and _trace is None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _trace, _W3C = trace, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("sandboxer") if provider else None


#: The `traceparent` of the running handler when its trace is not sampled: its messages
#: carry it on (so the decision holds downstream), and no child span is made.
_unsampled: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sandboxer_unsampled", default=None
)


def trace_headers(headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """`headers` with the current trace context added (W3C `traceparent`), when traces
    are on; `headers` as given when off."""
    if _tracer is None:
        return headers
    carrier = dict(headers or {})
    unsampled = _unsampled.get()
    if unsampled is not None:
        carrier["traceparent"] = unsampled
    else:
        _W3C.inject(carrier)
    return carrier


async def inject_http(request: httpx.Request) -> None:
    """An httpx request hook: the trace context goes to the provider or fin-hub."""
    if _tracer is not None:
        _W3C.inject(request.headers)


def _client_span(name: str, attributes: dict[str, str]) -> Any:
    """The context manager of a client span around an outgoing call, or None when not
    traced (or not sampled: no child spans then)."""
    if _tracer is None or _unsampled.get() is not None:
        return None
    return _tracer.start_as_current_span(name, kind=_trace.SpanKind.CLIENT, attributes=attributes)


@contextmanager
def span(name: str, **attributes: str) -> Iterator[None]:
    """A client span around an outgoing call, when traced (and sampled)."""
    around = _client_span(name, attributes)
    if around is None:
        yield
        return
    with around:
        yield


class provider_call:
    """Time one provider call into `sandboxer_provider_call_seconds` (and trace it). A
    class, not a generator: it runs twice on every provision."""

    __slots__ = ("_began", "_call", "_extension_id", "_span")

    def __init__(self, extension_id: str, call: str) -> None:
        self._extension_id = extension_id
        self._call = call

    def __enter__(self) -> None:
        name, attributes = (
            f"{self._extension_id} {self._call}",
            {"extension_id": self._extension_id},
        )
        self._span = _client_span(name, attributes) if _tracer is not None else None
        if self._span is not None:
            self._span.__enter__()
        self._began = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        elapsed = time.perf_counter() - self._began
        outcome = "ok" if kind is None else "error"
        _call_seconds(self._extension_id, self._call, outcome).observe(elapsed)
        if self._span is not None:
            self._span.__exit__(kind, *rest)


@functools.cache
def _call_seconds(extension_id: str, call: str, outcome: str) -> Any:
    """The histogram's child for these labels (`labels()` costs a lock and a lookup)."""
    return PROVIDER_CALL_SECONDS.labels(extension_id, call, outcome)


class _Delivered(Protocol):
    @property
    def subject(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def tracing() -> bool:
    return _tracer is not None


async def traced(delivery: _Delivered, consumer: str, work: Awaitable[None]) -> None:
    """Run one message's handler in a `<subject> process` span that continues the trace
    in its headers (traces on only: the wrapper is one more coroutine per message in
    flight). An unsampled handler passes its decision on and makes no child spans."""
    assert _tracer is not None
    attributes = {
        "messaging.system": "nats",
        "messaging.destination.name": delivery.subject,
        "messaging.consumer.group.name": consumer,
    }
    current = _tracer.start_span(
        f"{delivery.subject} process",
        context=_W3C.extract(delivery.headers),
        kind=_trace.SpanKind.CONSUMER,
        attributes=attributes,
    )
    if current.is_recording():
        with _trace.use_span(current, end_on_exit=True):
            await work
    else:  # nothing to record: pass the decision on, and skip the rest
        ids = current.get_span_context()
        _unsampled.set(f"00-{ids.trace_id:032x}-{ids.span_id:016x}-00")
        await work


@functools.cache
def handled_seconds(consumer: str, outcome: str) -> Any:
    """`sandboxer_handled_seconds` of one consumer and outcome (InFlight observes it)."""
    return HANDLED_SECONDS.labels(consumer, outcome)


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), if a span is recording."""
    if _tracer is None:
        return None
    current = _trace.get_current_span().get_span_context()
    return f"{current.trace_id:032x}" if current.is_valid else None


# -- log context ----------------------------------------------------------------------

#: The sandbox (and tenant) the running handler task works on.
about: contextvars.ContextVar[tuple[str | None, str | None]] = contextvars.ContextVar(
    "sandboxer_about", default=(None, None)
)


_binding = False


def keep_log_context() -> None:
    """From now on `bind` records what a task is about (JSON logs show it; text logs
    do not, and 10,000 handlers in flight then keep 3 MB less)."""
    global _binding
    _binding = True


def bind(sandbox_id: str | None, tenant: str | None) -> None:
    """Name the sandbox in this task's log lines (each handler runs in its own task)."""
    if _binding:
        about.set((sandbox_id, tenant))
