"""ext.e2b against the fake E2B control plane (real HTTP on loopback), with its platform
key in a real OpenBao and a real NATS: create, retries, lost answers, crash recovery by
tags, other deployments untouched, exact money."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import hvac
import pytest
from e2b import AsyncSandbox
from nats.js import JetStreamContext

from adapters.base import AdapterContext, Credentials, ProviderSandbox, SandboxSpec
from adapters.e2b import E2BAdapter
from adapters.registry import Registry
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.fakes.e2b import FakeE2B, Fault
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.errors import ProviderFailed, ProviderRejected, ProviderUnavailable
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import OPENBAO_ROOT_TOKEN, Start
from tests.helpers import (
    as_started,
    destroy,
    meter_events,
    provision,
    provision_by_cli,
    reconcile,
    wait_for_state,
    wait_for_status,
)

PLATFORM_PATH = "sandboxer/platform/e2b"  # the shipped manifest's secret_ref


@dataclass
class E2B:
    fake: FakeE2B
    api_key: str


@pytest.fixture
def e2b(openbao: EmbeddedOpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[E2B]:
    """A fake E2B whose only valid key is the platform key in OpenBao; workers started
    by the test (in-process or spawned) are pointed at both."""
    api_key = f"e2b_{uuid.uuid4().hex}"
    admin = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)
    admin.secrets.kv.v2.create_or_update_secret(
        path=PLATFORM_PATH, secret={"api_key": api_key}, mount_point="secret"
    )
    with FakeE2B(api_keys={api_key}) as fake:
        monkeypatch.setenv("SANDBOXER_E2B_API_URL", fake.url)
        monkeypatch.setenv("BAO_ADDR", openbao.url)
        monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
        monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
        yield E2B(fake, api_key)
    admin.secrets.kv.v2.delete_metadata_and_all_versions(  # leave no key to other tests
        path=PLATFORM_PATH, mount_point="secret"
    )


def adapter_for(settings: Settings, js: JetStreamContext, deployment: str = "test") -> E2BAdapter:
    manifest = Registry.load(settings.extensions_dir).extensions["ext.e2b"]
    return E2BAdapter(
        AdapterContext(manifest, replace(as_started(settings), deployment=deployment))
    )


# -- money ---------------------------------------------------------------------------


def test_cost_of_2_vcpu_512_mib_for_an_hour_is_exact(settings: Settings) -> None:
    registry = Registry.load(settings.extensions_dir)
    adapter = E2BAdapter(AdapterContext(registry.extensions["ext.e2b"], settings))
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sandbox = ProviderSandbox("abc", {}, False, start, {"cpu_count": 2, "memory_mb": 512})
    usage = adapter.meter_actual(sandbox, start + timedelta(seconds=3600))
    assert usage.actual_usd == Decimal("0.108900") and usage.duration_s == Decimal("3600.000")
    # The hold for a full TTL is the same figure, and a TTL past the plan's cap is capped.
    profile = registry.profile("profile.e2b-burst")
    assert adapter.estimate_cost(profile, 3600) == Decimal("0.108900")
    assert adapter.estimate_cost(profile, 7200) == Decimal("0.108900")
    # E2B stops a sandbox at its timeout: nothing is billed past the cap.
    late = adapter.meter_actual(sandbox, start + timedelta(hours=5))
    assert late.actual_usd == Decimal("0.108900")


# -- through the worker --------------------------------------------------------------


async def test_provision_and_destroy_through_the_worker(
    e2b: E2B,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
    fresh_tenant: str,
    settings: Settings,
) -> None:
    await start_worker()
    await start_billing()
    status = await provision(
        observer, fresh_tenant, "profile.e2b-burst", ttl_s=600, metadata={"team": "search"}
    )
    assert status.state is SandboxState.READY, status
    assert status.extension_id == "ext.e2b" and status.credential_source == "platform"
    made = e2b.fake.sandboxes[status.provider_sandbox_id or ""]
    assert len(made.sandbox_id) == 20 and made.template_id == "base"
    tags = {
        "sandboxer_sandbox_id": status.sandbox_id,
        "sandboxer_tenant": fresh_tenant,
        "sandboxer_deployment": "test",
    }
    assert made.metadata == {"team": "search", **tags}
    assert (made.end_at - made.started_at) == timedelta(seconds=600)
    assert status.estimate_usd == Decimal("0.018150")  # 600 s x 0.00003025

    await asyncio.sleep(1.2)
    done = await destroy(observer, status)
    assert made.killed_at is not None and e2b.fake.alive() == []
    stopped = [e for e in await meter_events(js, status.sandbox_id) if e["kind"] == "stopped"]
    assert len(stopped) == 1
    event = stopped[0]
    assert (event["extension_id"], event["cpu_count"], event["memory_mb"]) == ("ext.e2b", 2, 512)
    assert Decimal(event["duration_s"]) >= Decimal("1.2")
    expected = (Decimal(event["duration_s"]) * Decimal("0.00003025")).quantize(Decimal("1e-6"))
    assert done.actual_usd == Decimal(event["actual_usd"]) == expected > 0
    ledger = Ledger(js)
    for _ in range(100):
        debits = [e.amount_usd for e in await ledger.entries(fresh_tenant) if e.kind == "debit"]
        if debits:
            break
        await asyncio.sleep(0.05)
    assert debits == [expected]
    assert (await ledger.balance(fresh_tenant)).balance == Decimal("100") - expected


async def test_rate_limit_with_retry_after_then_success(
    e2b: E2B, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    await start_worker()
    e2b.fake.faults.append(Fault(status=429, retry_after="1", path="/v2/sandboxes"))
    began = asyncio.get_running_loop().time()
    status = await provision(observer, fresh_tenant, "profile.e2b-burst")
    assert status.state is SandboxState.READY, status
    assert asyncio.get_running_loop().time() - began >= 1.0  # Retry-After was honoured
    assert e2b.fake.requests["POST /v2/sandboxes"] == 2 and len(e2b.fake.sandboxes) == 1


async def test_lost_create_response_is_retried_into_the_same_sandbox(
    e2b: E2B, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    await start_worker()
    e2b.fake.faults.append(Fault(drop_after_acting=True, path="/v2/sandboxes"))
    status = await provision(observer, fresh_tenant, "profile.e2b-burst")
    assert status.state is SandboxState.READY, status
    assert e2b.fake.requests["POST /v2/sandboxes"] == 2  # the create was sent twice...
    assert list(e2b.fake.sandboxes) == [status.provider_sandbox_id]  # ...and made one
    assert len(e2b.fake.idempotency) == 1


async def test_refused_create_falls_back_to_the_next_route(
    e2b: E2B, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    await start_worker()
    e2b.fake.faults.append(Fault(status=429, should_retry="false", path="/v2/sandboxes"))
    status = await provision(observer, fresh_tenant, profile="profile.burst-sandbox")
    assert status.state is SandboxState.READY and status.extension_id == "ext.saas-stub"
    assert e2b.fake.requests["POST /v2/sandboxes"] == 1 and e2b.fake.sandboxes == {}


async def test_wrong_key_is_provider_rejected_and_never_printed(
    e2b: E2B,
    start_worker: Start,
    observer: Client,
    fresh_tenant: str,
    openbao: EmbeddedOpenBao,
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = f"e2b_wrong_{uuid.uuid4().hex}"
    admin = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)
    admin.secrets.kv.v2.create_or_update_secret(
        path=PLATFORM_PATH, secret={"api_key": wrong}, mount_point="secret"
    )
    caplog.set_level("DEBUG")
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.e2b-burst")
    assert status.state is SandboxState.FAILED and status.error is not None
    assert status.error.code is ErrorCode.PROVIDER_REJECTED
    assert "401" in status.error.message and "API key was refused" in status.error.message
    assert wrong not in status.model_dump_json() and wrong not in caplog.text
    assert e2b.fake.requests["POST /v2/sandboxes"] == 1  # a 401 is not retried
    assert (await Ledger(observer.js).balance(fresh_tenant)).held == 0  # the hold was released


async def test_unknown_template_keeps_e2b_error_code_in_the_message(
    e2b: E2B, settings: Settings, js: JetStreamContext
) -> None:
    adapter = adapter_for(settings, js)
    e2b.fake.faults.append(
        Fault(
            status=409,
            should_retry="false",
            path="/v2/sandboxes",
            error_code="idempotency_request_mismatch",
        )
    )
    spec = _spec("sbx-" + "1" * 24)
    key = Credentials("platform", {"api_key": e2b.api_key})
    with pytest.raises(ProviderFailed) as failed:
        await adapter.provision(spec, key)
    assert "error_code=idempotency_request_mismatch" in str(failed.value)
    assert not failed.value.retryable  # and not ProviderRejected: it may exist, no fallback
    with pytest.raises(ProviderRejected, match="template 'nope' not found"):
        await adapter.provision(replace(spec, template="nope"), key)
    e2b.fake.faults.append(Fault(status=503, retry_after="120", path="/v2/sandboxes"))
    with pytest.raises(ProviderUnavailable):  # too long to wait in a handler: redelivered
        await adapter.provision(spec, key)
    await adapter.aclose()


# -- crash recovery and other deployments ----------------------------------------------


def _spec(sandbox_id: str, deployment: str = "test", template: str | None = None) -> SandboxSpec:
    profile = Registry.load(Settings().extensions_dir).profile("profile.e2b-burst")
    now = datetime.now(UTC)
    return SandboxSpec(
        sandbox_id=sandbox_id,
        tenant="acme",
        deployment=deployment,
        profile=profile,
        ttl_s=300,
        expires_at=now + timedelta(seconds=300),
        template=template,
    )


async def test_worker_killed_after_create_is_adopted_by_reconcile(
    e2b: E2B,
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
    fresh_tenant: str,
) -> None:
    # The create succeeds; the worker is killed while it waits for the sandbox detail.
    e2b.fake.faults.append(Fault(method="GET", path="/sandboxes/", delay_s=30))
    doomed = spawn_worker()
    request = ProvisionRequest(request_id="crash", tenant=fresh_tenant, profile="profile.e2b-burst")
    await observer.provision(request)
    sandbox_id = sandbox_id_for(fresh_tenant, "crash")
    for _ in range(300):
        if e2b.fake.sandboxes:
            break
        await asyncio.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert (await wait_for_state(observer, sandbox_id, SandboxState.PROVISIONING)).ready_at is None

    dry = await reconcile(settings, js, dry_run=True, extension_id="ext.e2b")
    assert [(f.sandbox_id, f.action) for f in dry] == [(sandbox_id, "adopt")]
    claimed = await observer.status(sandbox_id)
    assert claimed is not None and claimed.state is SandboxState.PROVISIONING
    [found] = await reconcile(settings, js, extension_id="ext.e2b")
    assert found.action == "adopt" and found.tenant == fresh_tenant
    adopted = await wait_for_state(observer, sandbox_id, SandboxState.READY)
    assert adopted.provider_sandbox_id == found.provider_sandbox_id
    assert [e["kind"] for e in await meter_events(js, sandbox_id)] == ["started"]

    # The redelivered request finds it ready; the sandbox is destroyed and metered once.
    await start_worker()
    await destroy(observer, adopted)
    assert len(e2b.fake.sandboxes) == 1 and e2b.fake.alive() == []
    kinds = sorted(e["kind"] for e in await meter_events(js, sandbox_id))
    assert kinds == ["started", "stopped"]


async def test_reconcile_destroys_orphans_and_never_touches_other_deployments(
    e2b: E2B, observer: Client, js: JetStreamContext, settings: Settings
) -> None:
    adapter = adapter_for(settings, js)
    key = Credentials("platform", {"api_key": e2b.api_key})
    orphan = await adapter.provision(_spec("sbx-" + "a" * 24), key)  # no claim at all
    theirs = await adapter_for(settings, js, "staging").provision(
        _spec("sbx-" + "b" * 24, deployment="staging"), key
    )
    await adapter.aclose()
    # One made by someone else, through the official SDK, without our tags.
    plain = await AsyncSandbox.create(template="base", api_url=e2b.fake.url, api_key=e2b.api_key)

    findings = await reconcile(settings, js, extension_id="ext.e2b")
    assert [(f.provider_sandbox_id, f.action) for f in findings] == [
        (orphan.provider_sandbox_id, "destroy")
    ]
    alive = {s.sandbox_id for s in e2b.fake.alive()}
    assert alive == {theirs.provider_sandbox_id, plain.sandbox_id}
    assert await reconcile(settings, js, extension_id="ext.e2b") == []  # nothing left to do


async def test_find_follows_pagination(e2b: E2B, settings: Settings, js: JetStreamContext) -> None:
    adapter = adapter_for(settings, js)
    key = Credentials("platform", {"api_key": e2b.api_key})
    made = {
        (await adapter.provision(_spec(f"sbx-{i:024x}"), key)).provider_sandbox_id
        for i in range(130)
    }
    found = await adapter.find({"sandboxer_deployment": "test"}, key)
    assert {s.provider_sandbox_id for s in found} == made  # 100 + 30, over two pages
    assert e2b.fake.requests["GET /v2/sandboxes"] == 2
    assert {(s.meter_fields["cpu_count"], s.running) for s in found} == {(2, True)}
    await adapter.aclose()


async def test_provision_command_against_the_fake(
    e2b: E2B, start_worker: Start, settings: Settings, fresh_tenant: str
) -> None:
    """The acceptance command: `sandboxer provision --profile profile.e2b-burst --wait`."""
    await start_worker()
    status = await provision_by_cli(settings, fresh_tenant, "profile.e2b-burst")
    assert status.state is SandboxState.READY and status.extension_id == "ext.e2b"
    async with Client(settings.nats_url) as c:
        done = await wait_for_status(c, status.sandbox_id)
        assert done.provider_sandbox_id in e2b.fake.sandboxes


def test_operator_smoke_script_runs_against_the_fake(e2b: E2B) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "smoke_e2b.py"
    skipped = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "E2B_API_KEY": ""},
        check=True,
    )
    assert skipped.stdout.strip() == "skipped: E2B_API_KEY is not set"
    ran = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env={**os.environ, "E2B_API_KEY": e2b.api_key},
        check=True,
    )
    assert "idempotent" in ran.stdout and "destroyed after" in ran.stdout
    assert e2b.api_key not in ran.stdout + ran.stderr
    assert len(e2b.fake.sandboxes) == 1 and e2b.fake.alive() == []


async def test_a_template_bigger_than_its_profile_is_reported(
    e2b: E2B,
    start_worker: Start,
    observer: Client,
    fresh_tenant: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    e2b.fake.templates["base"] = (4, 1024)  # the profile says 2 vCPU, 512 MiB
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.e2b-burst")
    assert status.state is SandboxState.READY
    # 300 s x (4 x 0.000014 + 1 x 0.0000045) = 0.018150 billed, 0.009075 held
    assert (
        "bills 0.018150 USD for the whole TTL but 0.009075 was held; profile "
        "profile.e2b-burst understates"
    ) in caplog.text
    done = await destroy(observer, status)
    assert done.actual_usd is not None  # the debit is exact regardless
