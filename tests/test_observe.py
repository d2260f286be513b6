"""What an operator sees: Prometheus metrics served by real worker and billing
processes (and the Grafana dashboard's metrics among them), one trace per sandbox's
life, and JSON log lines that name the sandbox and never a credential."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
from nats.js import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from sandboxer import logs, observe
from sandboxer.client import Client
from sandboxer.dev.fakes.http import OtlpSink
from sandboxer.dev.servers import free_port
from sandboxer.settings import Settings
from schemas import SandboxState
from tests.conftest import ROOT, Start
from tests.fake_finhub import FakeFinHub
from tests.helpers import destroy, provision, sandboxer

METRIC = re.compile(r"\b((?:sandboxer|process)_[a-z_]+)")
Spawn = Callable[..., subprocess.Popen[bytes]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample a metrics endpoint serves, by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


async def until_served(port: int, check: Callable[[Samples], bool]) -> Samples:
    for _ in range(300):
        try:
            samples = await asyncio.to_thread(scrape, port)
        except httpx.TransportError:
            samples = {}
        if samples and check(samples):
            return samples
        await asyncio.sleep(0.1)
    raise AssertionError(f"metrics on {port} never got there: {sorted({n for n, _ in samples})}")


async def test_worker_and_billing_serve_the_domain_metrics_and_every_dashboard_metric(
    settings: Settings, js: JetStreamContext, spawn_worker: Spawn, spawn_billing: Spawn
) -> None:
    worker_port, billing_port = free_port(), free_port()
    with FakeFinHub() as hub:
        spawn_worker(
            SANDBOXER_METRICS_ADDR=f"127.0.0.1:{worker_port}", SANDBOXER_RECONCILE_EVERY_S="1"
        )
        spawn_billing(
            SANDBOXER_METRICS_ADDR=f"127.0.0.1:{billing_port}", SANDBOXER_FIN_HUB_URL=hub.url
        )
        await until_served(worker_port, lambda s: True)
        await until_served(billing_port, lambda s: True)
        async with Client(settings.nats_url) as client:
            ready = [await provision(client, "acme", "profile.burst-sandbox") for _ in range(2)]
            assert all(s.state is SandboxState.READY for s in ready)
            destroyed = await destroy(client, ready[0])
            unknown = await provision(client, "acme", "profile.nope")
            assert unknown.state is SandboxState.FAILED
        await js.publish("sandbox.provision", b"not json")  # a dead letter

        worker = await until_served(
            worker_port,
            lambda s: (
                total(s, "sandboxer_dead_letters_total") >= 1
                and total(s, "sandboxer_reconcile_actions_total") >= 1
            ),
        )
        billing = await until_served(
            billing_port, lambda s: total(s, "sandboxer_finhub_exports_total") >= 1
        )
        assert hub.traceparents == [None]  # no OTEL_* variables: no traces, no context

    stub = {"extension_id": "ext.saas-stub"}
    assert total(worker, "sandboxer_provisions_total", outcome="ready", **stub) == 2
    assert total(worker, "sandboxer_provisions_total", error_code="unknown_profile") == 1
    assert total(worker, "sandboxer_destroys_total", outcome="destroyed", **stub) == 1
    assert total(worker, "sandboxer_provider_call_seconds_count", call="provision", **stub) == 2
    assert total(worker, "sandboxer_provider_call_seconds_count", call="teardown", **stub) == 1
    assert total(worker, "sandboxer_credits_held_usd_total") > 0
    assert total(worker, "sandboxer_dead_letters_total", consumer="provisioner-provision") == 1
    assert destroyed.actual_usd is not None
    debited = float(destroyed.actual_usd)
    assert total(billing, "sandboxer_credits_debited_usd_total") == debited
    assert total(billing, "sandboxer_finhub_exports_total", outcome="delivered") == 1
    assert total(billing, "sandboxer_finhub_export_lag_seconds_count") == 1
    provisions = {"consumer": "provisioner-provision"}
    assert total(worker, "sandboxer_handled_seconds_count", outcome="ok", **provisions) >= 4
    assert total(billing, "sandboxer_handled_seconds_count", consumer="billing-meter") >= 2

    served = {name for name, _ in worker} | {name for name, _ in billing}
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\b((?:sandboxer|process)_[a-z_]+)", target["expr"]):
                assert metric in served, f"panel {panel['title']!r}: {metric} is not exported"


def test_json_logs_name_the_sandbox_and_redact_credentials_in_urls(tmp_path: Path) -> None:
    record = logging.LogRecord(
        "sandboxer.x",
        logging.WARNING,
        __file__,
        1,
        "calling %s and %s",
        ("nats://app:s3cret@10.0.0.1:4222", "https://h/x?token=abc&a=1"),
        None,
    )
    observe.keep_log_context()  # what SANDBOXER_LOG_FORMAT=json does
    observe.bind("sbx-" + "0" * 24, "acme")
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["sandbox_id"] == "sbx-" + "0" * 24 and line["tenant"] == "acme"
    assert line["level"] == "WARNING" and line["logger"] == "sandboxer.x"
    text = logs.TextFormatter().format(record)
    for said in (line["message"], text):
        assert "s3cret" not in said and "abc" not in said
        assert "nats://***@10.0.0.1:4222" in said and "token=***&a=1" in said


async def test_one_sandboxs_life_is_one_trace(
    settings: Settings, start_worker: Start, start_billing: Start
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observe.use_tracer_provider(provider)
    try:
        with FakeFinHub() as hub:
            await start_worker()
            await start_billing(fin_hub_url=hub.url)
            async with Client(settings.nats_url) as client:
                with provider.get_tracer("upstream").start_as_current_span("upstream") as root:
                    ready = await provision(client, "acme", "profile.burst-sandbox")
                    await destroy(client, ready)
                for _ in range(200):
                    if hub.accepted:
                        break
                    await asyncio.sleep(0.05)
            assert len(hub.traceparents) == 1
    finally:
        observe.use_tracer_provider(None)
    trace_id = root.get_span_context().trace_id
    spans = exporter.get_finished_spans()
    in_trace = {s.name for s in spans if s.context is not None and s.context.trace_id == trace_id}
    assert {
        "sandbox.provision process",  # the worker handles the request
        "ext.saas-stub provision",  # the provider's calls
        "ext.saas-stub wait_ready",
        "sandbox.destroy process",
        "ext.saas-stub teardown",
        "sandbox.meter.ext.saas-stub process",  # billing takes the stopped event
        "billing.usage process",  # the exporter takes the usage record
        "finhub POST",
    } <= in_trace, in_trace
    # fin-hub got the same trace in its request's headers.
    assert hub.traceparents[0] is not None and f"{trace_id:032x}" in hub.traceparents[0]


async def test_two_services_starting_at_once_share_one_endpoint(settings: Settings) -> None:
    # As `sandboxer dev` starts its worker and billing: both ask at the same moment.
    shared = replace(settings, metrics_addr=("127.0.0.1", free_port()))
    await asyncio.gather(observe.start(shared, "worker"), observe.start(shared, "billing"))
    assert shared.metrics_addr is not None
    port = shared.metrics_addr[1]
    served = await until_served(port, lambda s: any(n.startswith("sandboxer_") for n, _ in s))
    assert ("sandboxer_credits_held_usd_total", frozenset()) in served


async def test_a_taken_metrics_address_is_one_line(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await sandboxer(
            settings, "worker", SANDBOXER_METRICS_ADDR=f"127.0.0.1:{port}"
        )
    assert code == 1 and err.strip().splitlines()[-1].startswith(
        "sandboxer: SANDBOXER_METRICS_ADDR"
    )
    assert "cannot listen there" in err and "Traceback" not in err


async def stop_after_one_sandbox(settings: Settings, spawn_worker: Spawn, collector: str) -> float:
    """Provision one sandbox with a worker tracing to `collector` that keeps its spans
    queued, SIGTERM it: the seconds until it exited (with 0)."""
    worker = spawn_worker(
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector,
        OTEL_EXPORTER_OTLP_TIMEOUT="20",
        OTEL_BSP_SCHEDULE_DELAY="600000",  # nothing is sent before the exit
    )
    async with Client(settings.nats_url) as client:
        ready = await provision(client, "acme", "profile.burst-sandbox")
        assert ready.state is SandboxState.READY
    loop = asyncio.get_running_loop()
    stopping = loop.time()
    worker.terminate()
    assert await asyncio.to_thread(worker.wait, 60) == 0
    return loop.time() - stopping


async def test_a_stopping_worker_sends_its_queued_spans(
    settings: Settings, spawn_worker: Spawn
) -> None:
    with OtlpSink() as collector:
        await stop_after_one_sandbox(settings, spawn_worker, collector.base_url)
        assert collector.exports >= 1


async def test_a_worker_whose_trace_collector_is_gone_still_stops_promptly(
    settings: Settings, spawn_worker: Spawn
) -> None:
    # Nothing listens there: the exporter retries each batch until its own timeout.
    took = await stop_after_one_sandbox(settings, spawn_worker, f"http://127.0.0.1:{free_port()}")
    assert took < observe.TRACE_FLUSH_S + 3, f"{took:.1f} s from SIGTERM to exit"
