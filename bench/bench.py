"""`make bench`: throughput, latency and memory of the provisioner, on one nats-server.

(a) raw nats-py pull consume+ack rate: the ceiling;
(a2) the same through FastStream as the worker uses it (no dependency injection);
(a3) the same through FastStream's typed subscribers (what `apply_types=False` avoids);
(b) provision pipeline rate, zero-latency stub, one worker process;
(c) 1,000 provisions with 1 s stub latency: achieved rate / (in-flight limit / 1 s);
(d) p50/p99 broker-added latency at half of (b)'s rate;
(e) worker peak RSS with 10,000 sandboxes in flight;
(f) debits per second on one hot tenant, 8 billing processes; (g) hold placement latency;
(h) (b) and (d) with metrics served and traces exported over OTLP to a loopback sink
(every message traced, and 1 % sampled) against neither, each on a fresh server, with
the worker's metrics scraped while (b) runs.

Prints a table and writes bench/results.json. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

import tests.helpers
from consumers.app import _message_itself
from sandboxer import observe
from sandboxer.credits import Ledger
from sandboxer.dev.fakes.http import OtlpSink
from sandboxer.dev.servers import EmbeddedNats, free_port
from sandboxer.ids import sandbox_id_for
from sandboxer.topology import (
    BILLING_CONSUMER,
    METER_STREAM,
    PROVISION_CONSUMER,
    REQUESTS_STREAM,
    ensure_topology,
)
from schemas import ProvisionRequest, TenantLimits

ROOT = Path(__file__).resolve().parent.parent
PROFILE = "profile.burst-sandbox"


@contextmanager
def worker_process(
    url: str, log: Path, command: str = "worker", **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A `sandboxer worker` (or `billing`) child process, stopped with SIGTERM afterwards."""
    environment = {**os.environ, "SANDBOXER_NATS_URL": url, "SANDBOXER_DEPLOYMENT": "bench", **env}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", command, "--log-level", "WARNING"],
            env=environment,
            stdout=out,
            stderr=out,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def sampling(pid: int, out: Path) -> Iterator[None]:
    """py-spy samples `pid` (Python and native frames, when busy) into `out` while the
    block runs."""
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "500",
            "--format",
            "raw",
            "--idle",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def payload(tenant: str, request_id: str, ttl_s: int = 3600) -> bytes:
    return json.dumps(
        {"request_id": request_id, "tenant": tenant, "profile": PROFILE, "ttl_s": ttl_s}
    ).encode()


async def wait_consumers(js: Any, workers: int = 1) -> None:
    """Wait until new workers serve: a warm-up provision must be claimed (the durable
    consumers may still exist from an earlier phase, so their presence proves nothing),
    and each of `workers` must be waiting for provisions."""
    request_id = f"warmup-{time.monotonic_ns()}"
    nc = js._nc
    answers = await nc.subscribe(f"sandbox.status.*.{sandbox_id_for('warmup', request_id)}")
    for _ in range(100):
        try:
            await js.publish("sandbox.provision", payload("warmup", request_id))
            break
        except Exception:
            await asyncio.sleep(0.1)
    await answers.next_msg(timeout=60)
    await answers.unsubscribe()
    for _ in range(600):
        info = await js.consumer_info(REQUESTS_STREAM, PROVISION_CONSUMER)
        if info.num_waiting >= workers:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{workers} workers never all fetched provisions")


class ReadyCounter:
    """Counts `ready` announcements on sandbox.status.* and records when each came."""

    def __init__(self) -> None:
        self.ready_at: dict[str, float] = {}
        self.first_seen: float | None = None
        self.target = 0
        self.done = asyncio.Event()

    async def on_status(self, message: Any) -> None:
        now = time.perf_counter()
        if b'"tenant":"warmup"' in message.data:
            return
        if self.first_seen is None:
            self.first_seen = now
        if b'"state":"ready"' in message.data:
            sandbox_id = message.subject.rsplit(".", 1)[1]
            self.ready_at.setdefault(sandbox_id, now)
            if len(self.ready_at) >= self.target:
                self.done.set()


async def publish_all(js: Any, payloads: list[bytes]) -> None:
    for start in range(0, len(payloads), 500):
        await asyncio.gather(
            *(js.publish("sandbox.provision", p) for p in payloads[start : start + 500])
        )


async def preload_stream(js: Any, name: str, subject: str, n: int) -> None:
    """A file-backed stream holding `n` provision-sized messages on `subject`."""
    await js.add_stream(StreamConfig(name=name, subjects=[subject], storage=StorageType.FILE))
    body = payload("preload", "x")
    for start in range(0, n, 1000):
        await asyncio.gather(*(js.publish(subject, body) for _ in range(min(1000, n - start))))


async def bench_raw(url: str, n: int) -> float:
    """(a) messages/s of a bare pull consumer that acks each message."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await preload_stream(js, "BENCH_RAW", "bench.raw", n)
    sub = await js.pull_subscribe(
        "bench.raw",
        durable="raw",
        stream="BENCH_RAW",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
    )
    got = 0
    began = time.perf_counter()
    while got < n:
        for message in await sub.fetch(256, timeout=5):
            await message.ack()
            got += 1
    await nc.flush()
    elapsed = time.perf_counter() - began
    await nc.close()
    return n / elapsed


async def bench_faststream(url: str, n: int, *, typed: bool = False) -> float:
    """(a2) messages/s of a FastStream pull subscriber built like the worker's (same
    batch, concurrency and ack policy) whose handler only acks: FastStream's own cost.
    (a3, `typed`) the same with FastStream's typed subscribers: dependency injection on,
    the body parsed into a ProvisionRequest by FastStream, the message injected."""
    from faststream import AckPolicy as HandlerAckPolicy
    from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub

    stream, subject = ("BENCH_FS3", "bench.fs3") if typed else ("BENCH_FS", "bench.fs")
    nc = await nats.connect(url)
    js = nc.jetstream()
    await preload_stream(js, stream, subject, n)
    done = asyncio.Event()
    seen = 0
    broker = NatsBroker(url, logger=None, apply_types=typed)
    subscriber = broker.subscriber(
        subject,
        stream=JStream(stream, declare=False),
        durable="fs3" if typed else "fs",
        pull_sub=PullSub(batch_size=128, timeout=1.0),
        max_workers=1,  # as the worker: its handlers only start tasks
        ack_policy=HandlerAckPolicy.MANUAL,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1),
        decoder=None if typed else _message_itself,
    )

    async def acked(message: Any) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen >= n:
            done.set()

    async def typed_handler(body: ProvisionRequest, message: NatsMessage) -> None:
        assert body.tenant == "preload"
        await acked(message)

    subscriber(typed_handler if typed else acked)
    began = time.perf_counter()
    await broker.start()
    await asyncio.wait_for(done.wait(), timeout=300)
    elapsed = time.perf_counter() - began
    await broker.stop()
    await nc.close()
    return n / elapsed


#: Provisions are spread over this many tenants, as on a platform: holds of one tenant
#: are serialized (that is how no tenant can overspend), so (b1) measures one hot tenant.
TENANT_SPREAD = 64
SPREAD_PREFIXES = ("pipe", "pipetwo", "holds", "slow", "lat", "mem", "obs")
BENCH_TENANTS = (
    "warmup",
    "hot",
    "pipehot",
    "noisy",
    "victim",
    "hot2",
    "hot3",
    *(f"{prefix}{i}" for prefix in SPREAD_PREFIXES for i in range(TENANT_SPREAD)),
)


def spread(prefix: str, i: int, tenants: int = TENANT_SPREAD) -> str:
    """The tenant of request `i`: round-robin over `tenants` tenants."""
    return prefix if tenants == 1 else f"{prefix}{i % tenants}"


async def fund(url: str) -> None:
    """Credits for every tenant the benchmark provisions for."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    await ensure_topology(js)
    ledger = Ledger(js)
    for tenant in BENCH_TENANTS:
        await ledger.grant(tenant, Decimal(1_000_000), "bench")
    await nc.close()


async def bench_debits(url: str, log: Path, n: int, workers: int) -> tuple[float, bool]:
    """(f) `stopped` events billed per second for one hot tenant by `workers` billing
    processes sharing the durable consumer; and whether the balance is exact after."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    ledger = Ledger(js)
    before = await ledger.balance("hot")
    # Billing bills what the records say: each event's sandbox is stored first, as a
    # worker would have left it, before the clock starts.
    warmup = await tests.helpers.stopped_sandbox(js, 10**12, "hot")
    events: list[bytes] = []
    for start in range(0, n, 500):
        events += await asyncio.gather(
            *(
                tests.helpers.stopped_sandbox(js, i, "hot")
                for i in range(start, min(n, start + 500))
            )
        )
    with ExitStack() as stack:
        for _ in range(workers):
            stack.enter_context(worker_process(url, log, "billing"))
        # Warm-up: one event per process start-up, billed before the clock starts.
        await js.publish("sandbox.meter.ext.saas-stub", warmup)
        while not await _billing_drained(js):  # noqa: ASYNC110 - polling the server
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)  # the slower processes finish starting
        began = time.perf_counter()
        for start in range(0, n, 500):
            await asyncio.gather(
                *(js.publish("sandbox.meter.ext.saas-stub", e) for e in events[start : start + 500])
            )
        while not await _billing_drained(js):  # noqa: ASYNC110 - polling the server
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - began
    after = await ledger.balance("hot")
    await nc.close()
    billed = n + 1  # with the warm-up event
    exact = before.balance - after.balance == Decimal("0.000600") * billed and not after.holds
    return n / elapsed, exact


async def _billing_drained(js: JetStreamContext) -> bool:
    try:
        info = await js.consumer_info(METER_STREAM, BILLING_CONSUMER)
    except Exception:  # not created yet by the first billing process
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def bench_holds(url: str, n: int, concurrency: int) -> list[float]:
    """(g) latency of placing `n` holds on one tenant, `concurrency` at a time."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    ledger = Ledger(js)
    await ledger.balance("hot")  # warm the cache, as a running worker has it
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def hold(i: int) -> None:
        async with slots:
            began = time.perf_counter()
            await ledger.hold("hot", f"sbx-{10**9 + i:024x}", Decimal("0.009"))
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(hold(i) for i in range(n)))
    await nc.close()
    return latencies


async def place_holds(url: str, tag: str, n: int) -> None:
    """One process of (g2): once `bench.g2.go` comes, `n` holds spread over the bench's
    tenants, 128 at a time; prints `ready`, then the seconds they took."""
    nc = await nats.connect(url)
    ledger = Ledger(nc.jetstream(timeout=30))
    go = await nc.subscribe("bench.g2.go", max_msgs=1)
    slots = asyncio.Semaphore(128)

    async def hold(i: int) -> None:
        tenant = spread("holds", i)
        async with slots:
            await ledger.hold(tenant, sandbox_id_for(tenant, f"{tag}-{i}"), Decimal("0.0001"))

    print("ready", flush=True)
    await go.next_msg(timeout=60)
    began = time.perf_counter()
    await asyncio.gather(*(hold(i) for i in range(n)))
    print(time.perf_counter() - began, flush=True)
    await nc.close()


async def bench_holds_processes(url: str, n: int, processes: int) -> float:
    """(g2) holds per second that `processes` processes place at once for the same
    tenants: what their conflicts over each tenant's journal cost."""
    each = n // processes
    children = [
        await asyncio.create_subprocess_exec(
            *(sys.executable, __file__, "--hold-child", url, f"g2-{processes}-{p}", str(each)),
            stdout=asyncio.subprocess.PIPE,
        )
        for p in range(processes)
    ]
    for child in children:
        assert child.stdout is not None and (await child.stdout.readline()).strip() == b"ready"
    nc = await nats.connect(url)
    await nc.publish("bench.g2.go", b"")
    await nc.flush()
    took = []
    for child in children:
        out, _ = await child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"a (g2) process failed: {child.returncode}")
        took.append(float(out.strip()))
    await nc.close()
    return each * processes / max(took)


async def bench_holds_with_policy(
    url: str, n: int, concurrency: int, tenant: str, *, limited: bool
) -> list[float]:
    """(i) the same as (g) on a fresh `tenant`, with every limit of a consumer profile
    set (none reached) or none: the pair says what the check adds."""
    limits = (
        TenantLimits(
            max_concurrent=10**6,
            creates_per_minute=10**6,
            hourly_usd=Decimal(10**9),
            daily_usd=Decimal(10**9),
        )
        if limited
        else None
    )
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    ledger = Ledger(js)
    await ledger.balance(tenant)
    latencies: list[float] = []
    slots = asyncio.Semaphore(concurrency)

    async def hold(i: int) -> None:
        async with slots:
            began = time.perf_counter()
            sandbox_id = f"sbx-{2 * 10**9 + i:024x}"
            await ledger.hold(tenant, sandbox_id, Decimal("0.009"), limits=limits)
            latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(hold(i) for i in range(n)))
    await nc.close()
    return latencies


async def bench_cold_balance(url: str, sizes: list[int]) -> dict[int, float]:
    """(j) seconds for a fresh `Ledger` (a restarted worker) to read the balance of a
    tenant whose journal holds N entries, for each N of `sizes` (grants written
    straight onto the journal's subjects)."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=60)
    found: dict[int, float] = {}
    for n in sizes:
        tenant = f"cold{n}"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for start in range(0, n, 1000):
            batch = []
            for i in range(start, min(n, start + 1000)):
                entry = {
                    "entry_id": f"grant-j{i}",
                    "kind": "grant",
                    "tenant": tenant,
                    "amount_usd": "0.000001",
                    "at": now,
                }
                subject = f"credits.ledger.{tenant}.grant.grant-j{i}"
                batch.append(js.publish(subject, json.dumps(entry).encode()))
            await asyncio.gather(*batch)
        # The first fresh read folds everything (the entries were written around the
        # service, which checkpoints every 1,000 appends) and leaves a checkpoint, as
        # the service's own appends would have; the next fresh read starts there.
        began = time.perf_counter()
        await Ledger(js).balance(tenant)
        full = time.perf_counter() - began
        began = time.perf_counter()
        balance = await Ledger(js).balance(tenant)
        found[n] = time.perf_counter() - began
        assert balance.balance == Decimal(n) / 1_000_000, balance
        print(
            f"    (j) {n:>9,} entries: {found[n] * 1000:,.1f} ms from the checkpoint "
            f"({full * 1000:,.0f} ms folding them all)",
            flush=True,
        )
    await nc.close()
    return found


async def bench_fairness(url: str, log: Path, backlog: int, asks: int) -> list[float]:
    """(k) one tenant's `backlog` provisions queued (stub latency 1 s), then another
    tenant's `asks` provisions one after the other: their publish -> ready seconds."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    env = {"SANDBOXER_STUB_LATENCY_S": "1", "SANDBOXER_ACK_WAIT_S": "60"}
    with worker_process(url, log, **env) as proc:
        await wait_consumers(js)
        await publish_all(js, [payload("noisy", f"noisy-{i}") for i in range(backlog)])
        await asyncio.sleep(2.0)  # the worker has fetched and queued what it can
        waits = []
        for i in range(asks):
            request_id = f"victim-{i}"
            answers = await nc.subscribe(f"sandbox.status.*.{sandbox_id_for('victim', request_id)}")
            began = time.perf_counter()
            await js.publish("sandbox.provision", payload("victim", request_id))
            while b'"state":"ready"' not in (await answers.next_msg(timeout=120)).data:
                pass
            waits.append(time.perf_counter() - began)
            await answers.unsubscribe()
        proc.send_signal(signal.SIGKILL)  # no need to drain the backlog's fake latency
    await nc.close()
    return waits


async def run_provisions(
    url: str,
    log: Path,
    n: int,
    tenant: str,
    tenants: int = TENANT_SPREAD,
    *,
    profile: Path | None = None,
    workers: int = 1,
    **env: str,
) -> tuple[float, ReadyCounter, float]:
    """Provision `n` sandboxes with `workers` worker processes; (elapsed s, counter,
    the first worker's peak RSS). With `profile`, py-spy samples the first worker
    meanwhile into that file (raw stacks)."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    counter = ReadyCounter()
    counter.target = n
    payloads = [payload(spread(tenant, i, tenants), f"{tenant}-{i}") for i in range(n)]
    with contextlib.ExitStack() as processes:
        proc, *_ = [
            processes.enter_context(worker_process(url, log, **env)) for _ in range(workers)
        ]
        await wait_consumers(js, workers)
        sub = await nc.subscribe("sandbox.status.>", cb=counter.on_status)
        spy = sampling(proc.pid, profile) if profile else contextlib.nullcontext()
        with spy:
            # Timed from the first status seen to the last `ready`, so publishing and
            # worker start-up are not counted.
            await publish_all(js, payloads)
            await asyncio.wait_for(counter.done.wait(), timeout=600)
        rss = peak_rss_mib(proc.pid)
        await sub.unsubscribe()
    await nc.close()
    assert counter.first_seen is not None
    elapsed = max(counter.ready_at.values()) - counter.first_seen
    return elapsed, counter, rss


async def bench_latency(
    url: str, log: Path, rate: float, seconds: float, tag: str = "lat", **env: str
) -> list[float]:
    """(d) publish at `rate`/s; time from publish to the `ready` announcement."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    total = int(rate * seconds)

    async def on_status(message: Any) -> None:
        if b'"state":"ready"' in message.data:
            sandbox_id = message.subject.rsplit(".", 1)[1]
            began = sent.pop(sandbox_id, None)
            if began is not None:
                latencies.append(time.perf_counter() - began)
                if len(latencies) >= total:
                    done.set()

    with worker_process(url, log, SANDBOXER_STUB_LATENCY_S="0", **env):
        await wait_consumers(js)
        # Steady state: the worker has seen every tenant once (read its credits).
        await publish_all(js, [payload(spread("lat", i), f"{tag}-warm-{i}") for i in range(64)])
        await asyncio.sleep(1.0)
        await nc.subscribe("sandbox.status.>", cb=on_status)
        interval = 1.0 / rate
        start = time.perf_counter()
        pending: set[asyncio.Task[Any]] = set()
        for i in range(total):
            target = start + i * interval
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request_id = f"{tag}-{i}"
            tenant = spread("lat", i)
            sent[sandbox_id_for(tenant, request_id)] = time.perf_counter()
            task = asyncio.create_task(js.publish("sandbox.provision", payload(tenant, request_id)))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.wait_for(done.wait(), timeout=120)
    await nc.close()
    return latencies


def observed_env(metrics_port: int, sink: OtlpSink, sampled: str = "1") -> dict[str, str]:
    """A worker with metrics served and traces on, `sampled` the share of new traces
    kept (`1`: every message traced)."""
    return {
        "SANDBOXER_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{sink.base_url}/v1/traces",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": sampled,
    }


#: How often (h) scrapes the worker's metrics (Prometheus' default is 15 s or 60 s; a
#: scrape renders every series on the worker's event loop).
SCRAPE_EVERY_S = float(os.environ.get("BENCH_SCRAPE_EVERY_S", "1"))


async def scrape_while(port: int, stop: asyncio.Event) -> list[list[str]]:
    """The worker's domain metric lines, scraped every `SCRAPE_EVERY_S` until `stop`."""
    import httpx

    wanted = (
        "sandboxer_provisions_total",
        "sandboxer_credits_held_usd_total",
        "sandboxer_handlers_in_flight",
        "sandboxer_provider_call_seconds_count",
    )
    seen: list[list[str]] = []
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            try:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                seen.append([line for line in text.splitlines() if line.startswith(wanted)])
            except httpx.TransportError:
                pass
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_EVERY_S)
    return seen


#: (h)'s configurations: nothing on; metrics and every message traced; metrics and 1 %.
OBSERVED_MODES = {"off": None, "all": "1", "1%": "0.01"}


async def bench_observed(
    tmp: Path, log: Path, n: int, rate: float, seconds: float, rounds: int = 2
) -> tuple[dict[str, list[float]], dict[str, list[float]], list[list[str]], int]:
    """(h): (b) with `n` provisions and (d) at `rate`, each on a fresh server, in every
    mode of OBSERVED_MODES, rounds alternating their order (a server that has grown, or
    a noisy minute, must not pass for a cost). Rates and p50s by mode; the scrapes of
    the first traced (b); the OTLP exports received."""
    rates: dict[str, list[float]] = {mode: [] for mode in OBSERVED_MODES}
    p50s: dict[str, list[float]] = {mode: [] for mode in OBSERVED_MODES}
    scrapes: list[list[str]] = []
    with OtlpSink() as sink:
        for r in range(rounds):
            modes = list(OBSERVED_MODES) if r % 2 == 0 else list(reversed(OBSERVED_MODES))
            for mode in modes:
                sampled = OBSERVED_MODES[mode]
                port = free_port()
                env = {} if sampled is None else observed_env(port, sink, sampled)
                with EmbeddedNats(tmp / f"nats-h-{r}-{mode}") as server:
                    await fund(server.url)
                    stop = asyncio.Event()
                    scraping = asyncio.create_task(scrape_while(port, stop))
                    elapsed, _, _ = await run_provisions(
                        server.url,
                        log,
                        n,
                        "obs",
                        TENANT_SPREAD,
                        SANDBOXER_STUB_LATENCY_S="0",
                        **cast(dict[str, Any], env),
                    )
                    stop.set()
                    scraped = await scraping
                    if sampled == "1" and not scrapes:
                        scrapes = scraped
                    rates[mode].append(n / elapsed)
                    env = {} if sampled is None else observed_env(free_port(), sink, sampled)
                    latencies = await bench_latency(server.url, log, rate, seconds, **env)
                    p50s[mode].append(percentile(latencies, 0.5) * 1000)
                print(
                    f"    (h) round {r + 1} {mode}: {n / elapsed:,.0f}/s, p50 "
                    f"{p50s[mode][-1]:.2f} ms",
                    flush=True,
                )
    return rates, p50s, scrapes, sink.exports


class _Delivered:
    subject = "sandbox.provision"
    headers: dict[str, str] = {}


async def _one_provisions_observing() -> None:
    """What a provision adds for observability in the worker: two provider calls, two
    publishes' headers, an outcome."""
    with observe.provider_call("ext.saas-stub", "provision"):
        pass
    with observe.provider_call("ext.saas-stub", "wait_ready"):
        pass
    observe.trace_headers({"Nats-Msg-Id": "x"})
    observe.trace_headers()
    observe.PROVISIONS.labels("ext.saas-stub", "ready", "").inc()


async def observe_overhead_us(n: int = 20_000) -> dict[str, float]:
    """Microseconds of worker CPU per provision spent on metrics and traces: off, 1 %
    sampled and every message sampled (spans kept in memory: no export)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    found = {}
    for mode, ratio in (("off", None), ("1%", 0.01), ("all", 1.0)):
        provider = None
        if ratio is not None:
            provider = TracerProvider(sampler=ParentBasedTraceIdRatio(ratio))
            provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
        observe.use_tracer_provider(provider)
        began = time.perf_counter()
        for _ in range(n):
            one = time.perf_counter()
            if observe.tracing():
                await observe.traced(_Delivered(), "bench", _one_provisions_observing())
            else:
                await _one_provisions_observing()
            observe.handled_seconds("bench", "ok").observe(time.perf_counter() - one)
        found[mode] = (time.perf_counter() - began) / n * 1e6
    observe.use_tracer_provider(None)
    return found


async def figure_h(
    tmp: Path, log: Path, args: argparse.Namespace, rate: float, results: dict[str, Any]
) -> None:
    """(h): what metrics and traces cost (b) and (d), into `results`."""
    rates, p50s, scrapes, exports = await bench_observed(
        tmp,
        log,
        args.pipeline_messages // 2,
        rate,
        args.latency_seconds / 2,
        rounds=args.rounds,
    )
    base, base_p50 = statistics.median(rates["off"]), statistics.median(p50s["off"])
    for mode, key in (("all", "h_all"), ("1%", "h_sampled")):
        # Paired by round: each round's runs are minutes apart, not a noisy hour.
        costs = [1 - on / off for on, off in zip(rates[mode], rates["off"], strict=True)]
        added = [on - off for on, off in zip(p50s[mode], p50s["off"], strict=True)]
        on, on_p50 = statistics.median(rates[mode]), statistics.median(p50s[mode])
        results[f"{key}_pipeline_per_s"] = round(on)
        results[f"{key}_cost"] = round(statistics.median(costs), 3)
        results[f"{key}_d_p50_added_ms"] = round(statistics.median(added), 2)
        print(
            f"(h) metrics + traces, {mode} of messages sampled, vs. off (fresh "
            f"servers; medians of each round's pair): (b) {on:,.0f}/s vs {base:,.0f}/s, "
            f"cost {100 * statistics.median(costs):.1f} % (rounds: "
            f"{', '.join(f'{100 * c:.1f}' for c in costs)}); (d) p50 {on_p50:.2f} ms "
            f"vs {base_p50:.2f} ms, added {statistics.median(added):+.2f} ms",
            flush=True,
        )
    cost = await observe_overhead_us()
    names = {"off": "off", "1%": "sampled", "all": "all"}
    for mode, us in cost.items():
        results[f"h_overhead_us_{names[mode]}"] = round(us, 1)
    print(
        "    per provision in the worker (microbenchmark, export aside): "
        + ", ".join(f"{mode} {us:.1f} us" for mode, us in cost.items()),
        flush=True,
    )
    print(f"    {exports} OTLP exports received; worker metrics during (h):", flush=True)
    middle = scrapes[len(scrapes) // 2] if scrapes else []
    for line in [*middle[:6], "    ...", *(scrapes[-1][:6] if scrapes else [])]:
        print(f"    {line}", flush=True)


#: Where a sampled frame's file lives, most specific first: the layer it is counted in.
LAYERS = (
    ("the event loop (uvloop, C)", ("Runner.run (asyncio/runners.py", "uvloop", "Loop.")),
    ("FastStream", ("(faststream/", "(fast_depends/", "(anyio/")),
    ("nats-py", ("(nats/", "(sandboxer/connect.py")),  # with our lean request/reply
    ("pydantic", ("(pydantic", "pydantic_core", "pydantic-core")),
    ("asyncio", ("(asyncio/",)),
    ("json", ("(json/", "_json")),
    ("sandboxer", ("(consumers/", "(adapters/", "(sandboxer/", "(schemas/")),
)
#: Frames of our modules that py-spy names by file alone.
OURS = (
    "provision.py",
    "delivery.py",
    "claims.py",
    "metering.py",
    "lifecycle.py",
    "app.py",
    "statuses.py",
    "credits.py",
    "policy.py",
    "saas_stub.py",
    "routing.py",
    "observe.py",
)
#: Our steps of a provision, by the function that does each (inclusive time).
STEPS = (
    ("claim (status KV create)", "Claims.claim ("),
    ("credit hold", "Ledger.hold ("),
    ("TTL schedule", "Expiry.schedule ("),
    ("stub create", "SaasStubAdapter.provision ("),
    ("meter event + ready status", "Metering.mark_ready ("),
    ("ack", "_FastStreamDelivery.ack ("),
    ("the handler (all of the above)", "Provisioning.on_provision ("),
)


def profile_report(raw: Path) -> str:
    """Where the worker's CPU went: self time by layer, and inclusive time of each step
    of a provision, as shares of the samples that were not idle."""
    by_layer: dict[str, int] = {}
    by_step: dict[str, int] = {}
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        if "epoll_wait" in leaf:
            idle += count
            continue
        busy += count
        layer = next(
            (name for name, marks in LAYERS if any(m in leaf for m in marks)),
            "sandboxer" if any(f"({f}:" in leaf for f in OURS) else "other (stdlib, C)",
        )
        by_layer[layer] = by_layer.get(layer, 0) + count
        for name, mark in STEPS:
            if any(mark in frame for frame in frames):
                by_step[name] = by_step.get(name, 0) + count
    lines = [f"worker samples: {busy:,} busy, {idle:,} idle", "self time by layer:"]
    for name, count in sorted(by_layer.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {count / busy:6.1%}  {name}")
    lines.append("inclusive time of each step:")
    for name, _ in STEPS:
        lines.append(f"  {by_step.get(name, 0) / busy:6.1%}  {name}")
    return "\n".join(lines)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "python": platform.python_version(),
    }
    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-") as tmp:
        log = Path(tmp) / "workers.log"
        if args.only == "h":
            await figure_h(Path(tmp), log, args, args.rate, results)
            return results
        if args.only in ("gi", "e"):
            with EmbeddedNats(Path(tmp) / "nats-gi") as server:
                await fund(server.url)
                if args.only == "e":
                    rss = await bench_rss(server.url, log, args.rss_sandboxes)
                    print(f"(e) worker peak RSS, {args.rss_sandboxes:,} in flight: {rss:.1f} MiB")
                    return results
                plain = percentile(
                    await bench_holds_with_policy(server.url, 2000, 16, "hot3", limited=False),
                    0.5,
                )
                checked = percentile(
                    await bench_holds_with_policy(server.url, 2000, 16, "hot2", limited=True),
                    0.5,
                )
                print(f"(i) p50 {checked * 1000:.2f} ms with limits, {plain * 1000:.2f} without")
            return results
        if args.only == "b":
            with EmbeddedNats(Path(tmp) / "nats-b") as server:
                await fund(server.url)
                raw = await bench_raw(server.url, args.raw_messages)
                elapsed, _, _ = await run_provisions(
                    server.url,
                    log,
                    args.pipeline_messages,
                    "pipe",
                    profile=args.profile,
                    SANDBOXER_STUB_LATENCY_S="0",
                )
            rate = args.pipeline_messages / elapsed
            print(f"(a) {raw:,.0f} msg/s; (b) {rate:,.0f}/s = {rate / raw:.3f} x (a)")
            if args.profile:
                print(profile_report(args.profile))
            return results
        if args.only in ("c", "d"):
            with EmbeddedNats(Path(tmp) / "nats-cd") as server:
                await fund(server.url)
                if args.only == "c":
                    elapsed, _, _ = await run_provisions(
                        server.url,
                        log,
                        1000,
                        "slow",
                        SANDBOXER_STUB_LATENCY_S="1",
                        SANDBOXER_MAX_IN_FLIGHT="256",
                    )
                    print(f"(c) {elapsed:.2f} s, efficiency {(1000 / elapsed) / 256:.3f}")
                    return results
                latencies = await bench_latency(server.url, log, args.rate, args.latency_seconds)
            p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
            print(f"(d) at {args.rate:,.0f}/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
            return results
        if args.only == "j":
            with EmbeddedNats(Path(tmp) / "nats-j") as server:
                await fund(server.url)
                await bench_cold_balance(server.url, args.ledger_sizes)
            return results
        if args.only == "g2":
            with EmbeddedNats(Path(tmp) / "nats-g2") as server:
                await fund(server.url)
                rate = await bench_holds_processes(server.url, 8000, args.workers)
            print(f"(g2) {rate:,.0f} holds/s, 64 tenants, {args.workers} processes at once")
            return results
        if args.only == "f":
            with EmbeddedNats(Path(tmp) / "nats-f") as server:
                await fund(server.url)
                rate, exact = await bench_debits(server.url, log, args.debits, args.workers)
            print(
                f"(f) {rate:,.0f} debits/s, one tenant, {args.workers} billing processes; "
                f"balance exact: {exact}"
            )
            return results
        if args.only == "k":
            with EmbeddedNats(Path(tmp) / "nats-k") as server:
                await fund(server.url)
                waits = await bench_fairness(server.url, log, args.fairness_backlog, 20)
            print(f"(k) p50 {percentile(waits, 0.5):.2f} s, p99 {percentile(waits, 0.99):.2f} s")
            return results
        with EmbeddedNats(Path(tmp) / "nats") as server:
            url = server.url
            await fund(url)
            raw = await bench_raw(url, args.raw_messages)
            results["a_raw_pull_ack_msgs_per_s"] = round(raw)
            print(f"(a) raw pull consume+ack: {raw:,.0f} msg/s", flush=True)
            ceiling = await bench_faststream(url, args.raw_messages)
            results["a2_faststream_ack_only_msgs_per_s"] = round(ceiling)
            print(
                f"(a2) FastStream pull consume+ack, worker's settings: {ceiling:,.0f} msg/s",
                flush=True,
            )
            typed = await bench_faststream(url, args.raw_messages, typed=True)
            results["a3_faststream_typed_msgs_per_s"] = round(typed)
            print(
                f"(a3) the same with typed subscribers (DI, pydantic body): {typed:,.0f} msg/s"
                f" = {typed / ceiling:.2f} x (a2)",
                flush=True,
            )

            elapsed, _, _ = await run_provisions(
                url, log, args.pipeline_messages, "pipe", SANDBOXER_STUB_LATENCY_S="0"
            )
            pipeline = args.pipeline_messages / elapsed
            results["b_pipeline_provisions_per_s"] = round(pipeline)
            results["b_over_a"] = round(pipeline / raw, 3)
            results["b_over_a2"] = round(pipeline / ceiling, 3)
            print(
                f"(b) provision pipeline, {TENANT_SPREAD} tenants: {pipeline:,.0f}/s = "
                f"{pipeline / raw:.3f} x (a), {pipeline / ceiling:.3f} x (a2)",
                flush=True,
            )
            elapsed, _, _ = await run_provisions(
                url, log, 3000, "pipehot", tenants=1, SANDBOXER_STUB_LATENCY_S="0"
            )
            results["b1_one_tenant_provisions_per_s"] = round(3000 / elapsed)
            print(f"(b1) provision pipeline, one tenant: {3000 / elapsed:,.0f}/s", flush=True)
            elapsed, _, _ = await run_provisions(
                url, log, 6000, "pipetwo", workers=2, SANDBOXER_STUB_LATENCY_S="0"
            )
            results["b2_two_workers_provisions_per_s"] = round(6000 / elapsed)
            print(
                f"(b2) provision pipeline, {TENANT_SPREAD} tenants, two worker processes: "
                f"{6000 / elapsed:,.0f}/s",
                flush=True,
            )

            limit = 256
            elapsed, _, _ = await run_provisions(
                url,
                log,
                1000,
                "slow",
                SANDBOXER_STUB_LATENCY_S="1",
                SANDBOXER_MAX_IN_FLIGHT=str(limit),
            )
            efficiency = (1000 / elapsed) / (limit / 1.0)
            results["c_concurrency_efficiency"] = round(efficiency, 3)
            results["c_elapsed_s"] = round(elapsed, 2)
            print(
                f"(c) 1,000 x 1 s latency, limit {limit}: {elapsed:.2f}s, "
                f"efficiency {efficiency:.3f}",
                flush=True,
            )

            rate = pipeline / 2
            latencies = await bench_latency(url, log, rate, args.latency_seconds)
            p50, p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
            results["d_rate_per_s"] = round(rate)
            results["d_p50_ms"] = round(p50, 2)
            results["d_p99_ms"] = round(p99, 2)
            print(f"(d) latency at {rate:,.0f}/s: p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
            debits, exact = await bench_debits(url, log, args.debits, workers=8)
            results["f_debits_per_s_one_tenant_8_workers"] = round(debits)
            results["f_balance_exact"] = exact
            print(
                f"(f) debits, one tenant, 8 billing processes: {debits:,.0f}/s, "
                f"balance exact: {exact}",
                flush=True,
            )

            await figure_h(Path(tmp), log, args, rate, results)  # its (d) at (d)'s rate

            holds = await bench_holds(url, 2000, concurrency=16)
            results["g_hold_p50_ms"] = round(percentile(holds, 0.5) * 1000, 2)
            results["g_hold_p99_ms"] = round(percentile(holds, 0.99) * 1000, 2)
            print(
                f"(g) hold placement, one tenant, 16 at once: "
                f"p50 {results['g_hold_p50_ms']} ms, p99 {results['g_hold_p99_ms']} ms",
                flush=True,
            )
            for processes in (1, 2):
                placed = await bench_holds_processes(url, 8000, processes)
                results[f"g2_holds_per_s_{processes}_processes"] = round(placed)
                print(
                    f"(g2) holds, {TENANT_SPREAD} tenants, {processes} process(es) at once: "
                    f"{placed:,.0f}/s",
                    flush=True,
                )
            plain = percentile(
                await bench_holds_with_policy(url, 2000, 16, "hot3", limited=False), 0.5
            )
            limited = percentile(
                await bench_holds_with_policy(url, 2000, 16, "hot2", limited=True), 0.5
            )
            results["i_hold_with_policy_p50_ms"] = round(limited * 1000, 2)
            results["i_policy_added_ms"] = round((limited - plain) * 1000, 2)
            print(
                f"(i) the same on fresh tenants, every consumer limit set or none: p50 "
                f"{limited * 1000:.2f} ms vs {plain * 1000:.2f} ms "
                f"({results['i_policy_added_ms']:+.2f} ms)",
                flush=True,
            )
        with EmbeddedNats(Path(tmp) / "nats-k") as server:
            await fund(server.url)
            waits = await bench_fairness(server.url, log, args.fairness_backlog, 20)
            results["k_victim_p50_s"] = round(percentile(waits, 0.5), 2)
            results["k_victim_p99_s"] = round(percentile(waits, 0.99), 2)
            print(
                f"(k) another tenant's publish->ready while one has {args.fairness_backlog:,} "
                f"queued (stub 1 s): p50 {results['k_victim_p50_s']} s, "
                f"p99 {results['k_victim_p99_s']} s",
                flush=True,
            )
        with EmbeddedNats(Path(tmp) / "nats-j") as server:
            await fund(server.url)
            cold = await bench_cold_balance(server.url, args.ledger_sizes)
            for n, seconds in cold.items():
                results[f"j_cold_balance_ms_{n}"] = round(seconds * 1000, 1)
            print(
                "(j) cold balance read: "
                + ", ".join(f"{n:,}: {s * 1000:,.0f} ms" for n, s in cold.items()),
                flush=True,
            )
        # (e) runs on a fresh server with a long latency: all sandboxes in flight at once.
        with EmbeddedNats(Path(tmp) / "nats-e") as server:
            await fund(server.url)
            rss = await bench_rss(server.url, log, args.rss_sandboxes)
            results["e_peak_rss_mib"] = round(rss, 1)
            results["e_in_flight"] = args.rss_sandboxes
            print(
                f"(e) worker peak RSS, {args.rss_sandboxes:,} in flight: {rss:.1f} MiB", flush=True
            )
    return results


async def bench_rss(url: str, log: Path, n: int) -> float:
    """(e) peak RSS of a worker holding `n` slow provider calls at once."""
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=30)
    provisioning: set[str] = set()
    all_in = asyncio.Event()

    async def on_status(message: Any) -> None:
        if b'"state":"provisioning"' in message.data and b'"tenant":"mem' in message.data:
            provisioning.add(message.subject)
            if len(provisioning) >= n:
                all_in.set()

    # n + 1: the warm-up request stays in flight too.
    env = {
        "SANDBOXER_STUB_LATENCY_S": "120",
        "SANDBOXER_MAX_IN_FLIGHT": str(n + 1),
        "SANDBOXER_ACK_WAIT_S": "60",
    }
    with worker_process(url, log, **env) as proc:
        await wait_consumers(js)
        await nc.subscribe("sandbox.status.>", cb=on_status)
        await publish_all(js, [payload(spread("mem", i), f"mem-{i}") for i in range(n)])
        await asyncio.wait_for(all_in.wait(), timeout=300)
        await asyncio.sleep(2)  # let every handler reach its provider call
        rss = peak_rss_mib(proc.pid)
        proc.send_signal(signal.SIGKILL)  # no need to drain 120 s of fake latency
    await nc.close()
    return rss


TARGETS = [
    ("h_sampled_cost", "<=", 0.05, "(h) metrics + traces (1 % sampled) cost <= 5 % of (b)"),
    ("h_sampled_d_p50_added_ms", "<=", 0.5, "(h) the same add <= 0.5 ms to (d) p50"),
    ("h_all_cost", "<=", 0.05, "(h) metrics + every message traced: <= 5 % of (b)"),
    ("h_all_d_p50_added_ms", "<=", 0.5, "(h) the same add <= 0.5 ms to (d) p50"),
    ("b_over_a", ">=", 0.15, "(b) >= 0.15 x (a)"),
    ("c_concurrency_efficiency", ">=", 0.9, "(c) >= 0.9"),
    ("d_p99_ms", "<=", 5.0, "(d) p99 <= 5 ms"),
    ("e_peak_rss_mib", "<=", 150.0, "(e) <= 150 MiB"),
    ("i_policy_added_ms", "<=", 1.0, "(i) the policy check adds <= 1 ms to (g) p50"),
    ("k_victim_p99_s", "<=", 2.0, "(k) a victim's p99 behind 10,000 queued <= 2 s"),
    ("j_cold_balance_ms_1000000", "<=", 100.0, "(j) cold balance read at 10^6 entries <= 100 ms"),
    ("f_debits_per_s_one_tenant_8_workers", ">=", 2000, "(f) >= 2,000 debits/s"),
    ("f_balance_exact", "==", True, "(f) no lost updates"),
]


def report(results: dict[str, Any]) -> None:
    print("\n| target | measured | met |\n|---|---|---|")
    for key, op, bound, label in TARGETS:
        if key not in results:
            print(f"| {label} | not measured | - |")
            continue
        value = results[key]
        met = {">=": value >= bound, "<=": value <= bound, "==": value == bound}[op]
        print(f"| {label} | {value} | {'yes' if met else 'NO'} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-messages", type=int, default=50_000)
    parser.add_argument("--pipeline-messages", type=int, default=10_000)
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rss-sandboxes", type=int, default=10_000)
    parser.add_argument("--debits", type=int, default=5_000)
    parser.add_argument(
        "--workers", type=int, default=8, help="processes of --only f (billing) or g2 (holds)"
    )
    parser.add_argument("--fairness-backlog", type=int, default=10_000)
    parser.add_argument(
        "--ledger-sizes",
        type=lambda text: [int(float(n)) for n in text.split(",")],
        default=[1_000, 10_000, 100_000, 1_000_000],
        help="journal lengths of (j), comma-separated",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument(
        "--only",
        choices=["b", "c", "d", "h", "k", "gi", "g2", "e", "j", "f"],
        help="measure one figure alone (printed, not written): h at --rate for its (d)",
    )
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument(
        "--profile",
        type=Path,
        help="with --only b: py-spy the worker into this file and print where the time goes",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of (h), on fresh servers (medians)"
    )
    if sys.argv[1:2] == ["--hold-child"]:  # one process of (g2)
        url, tag, n = sys.argv[2:5]
        asyncio.run(place_holds(url, tag, int(n)))
        sys.exit(0)
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.only:
        sys.exit(0)
    report(figures)
    arguments.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nwritten: {arguments.out}")
