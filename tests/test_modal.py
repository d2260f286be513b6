"""ext.modal against the fake Modal gRPC server, driven by the official `modal` client
inside the adapter, with its token in a real OpenBao and a real NATS: CPU and GPU
sandboxes, terminate, orphans found by tags, fallback on a refusal and not on a
deadline, exact money."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import hvac
import pytest
from grpclib import GRPCError, Status
from modal_proto.api_pb2 import GenericResult
from nats.js import JetStreamContext

from adapters.base import AdapterContext, ProviderSandbox
from adapters.modal import ModalAdapter
from adapters.registry import Registry
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.fakes.modal import FakeModal
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import ProvisionRequest, SandboxState
from tests.conftest import OPENBAO_ROOT_TOKEN, Start
from tests.helpers import (
    destroy,
    meter_events,
    provision,
    provision_by_cli,
    reconcile,
    stub_sandboxes,
    wait_for_state,
)


@dataclass
class Modal:
    fake: FakeModal


@pytest.fixture
def modal_fake(openbao: EmbeddedOpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[Modal]:
    """A fake Modal whose only valid token is the platform token in OpenBao. E2B has no
    key, so profile.burst-sandbox routes to Modal first."""
    admin = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)
    with FakeModal() as fake:
        fake.state.token_id, fake.state.token_secret = "ak-" + uuid.uuid4().hex, "as-secret"
        admin.secrets.kv.v2.create_or_update_secret(
            path="sandboxer/platform/modal",
            mount_point="secret",
            secret={"token_id": fake.state.token_id, "token_secret": fake.state.token_secret},
        )
        admin.secrets.kv.v2.delete_metadata_and_all_versions(
            path="sandboxer/platform/e2b", mount_point="secret"
        )
        monkeypatch.setenv("MODAL_SERVER_URL", fake.url)
        monkeypatch.setenv("BAO_ADDR", openbao.url)
        monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
        monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
        yield Modal(fake)
    admin.secrets.kv.v2.delete_metadata_and_all_versions(  # leave no key to other tests
        path="sandboxer/platform/modal", mount_point="secret"
    )


def test_cost_of_one_h100_for_600_s_is_the_manifest_formula(settings: Settings) -> None:
    registry = Registry.load(settings.extensions_dir)
    adapter = ModalAdapter(AdapterContext(registry.extensions["ext.modal"], settings))
    profile = registry.profile("profile.modal-gpu")  # 1 H100, 4 cores, 16 GiB
    # 600 s x (0.001097 H100 + 4 x 0.00003942 per core + 16 x 0.00000672 per GiB)
    expected = Decimal("600") * (
        Decimal("0.001097") + 4 * Decimal("0.00003942") + 16 * Decimal("0.00000672")
    )
    assert expected == Decimal("0.817320")
    assert adapter.estimate_cost(profile, 600) == expected
    start = datetime(2026, 1, 1, tzinfo=UTC)
    sandbox = ProviderSandbox(
        "sb-x",
        {},
        False,
        start,
        {"cpu_cores": "4", "memory_mb": 16384, "gpu_type": "H100", "gpu_count": 1},
    )
    usage = adapter.meter_actual(sandbox, start + timedelta(seconds=600))
    assert usage.actual_usd == expected and usage.duration_s == Decimal("600.000")
    assert usage.meter_fields["gpu_type"] == "H100"


async def test_gpu_sandbox_through_the_worker_is_debited_exactly(
    modal_fake: Modal,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
    fresh_tenant: str,
) -> None:
    await start_worker()
    await start_billing()
    status = await provision(observer, fresh_tenant, "profile.modal-gpu")
    assert status.state is SandboxState.READY, status
    assert status.extension_id == "ext.modal" and status.credential_source == "platform"
    made = modal_fake.fake.state.sandboxes[status.provider_sandbox_id or ""]
    assert made.version == 1 and made.gpu == ("H100", 1)  # GPU: the V1 create
    assert made.definition.resources.milli_cpu == 4000
    assert made.definition.resources.memory_mb == 16384
    assert made.definition.timeout_secs == 600 and made.definition.name == status.sandbox_id
    assert made.tags["sandboxer_sandbox_id"] == status.sandbox_id
    assert made.tags["sandboxer_deployment"] == "test"
    assert status.estimate_usd == Decimal("0.817320")

    await asyncio.sleep(1.0)
    done = await destroy(observer, status)
    assert not made.running and made.result.status == GenericResult.GENERIC_STATUS_TERMINATED
    [stopped] = [e for e in await meter_events(js, status.sandbox_id) if e["kind"] == "stopped"]
    assert (stopped["gpu_type"], stopped["gpu_count"], stopped["memory_mb"]) == ("H100", 1, 16384)
    per_second = Decimal("0.0013622")
    expected = (Decimal(stopped["duration_s"]) * per_second).quantize(Decimal("1e-6"))
    assert done.actual_usd == Decimal(stopped["actual_usd"]) == expected > 0
    for _ in range(100):
        debits = [e.amount_usd for e in await Ledger(js).entries(fresh_tenant) if e.kind == "debit"]
        if debits:
            break
        await asyncio.sleep(0.05)
    assert debits == [expected]


async def test_cpu_sandbox_uses_v2_and_terminate_is_idempotent(
    modal_fake: Modal, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.burst-sandbox")
    assert status.state is SandboxState.READY and status.extension_id == "ext.modal", status
    made = modal_fake.fake.state.sandboxes[status.provider_sandbox_id or ""]
    assert made.version == 2 and made.gpu == ("", 0)
    await destroy(observer, status)
    await destroy(observer, status)  # again: answered from the stored status
    assert modal_fake.fake.state.alive() == []
    assert modal_fake.fake.state.calls["SandboxTerminateV2"] == 1


async def test_quota_refusal_falls_back_to_the_next_route(
    modal_fake: Modal,
    start_worker: Start,
    observer: Client,
    fresh_tenant: str,
    js: JetStreamContext,
) -> None:
    await start_worker()
    modal_fake.fake.state.fail(
        "SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "Sandbox limit reached for workspace"
    )
    status = await provision(observer, fresh_tenant, "profile.burst-sandbox")
    assert status.state is SandboxState.READY and status.extension_id == "ext.saas-stub"
    assert modal_fake.fake.state.sandboxes == {} and len(await stub_sandboxes(js)) == 1


async def test_deadline_after_create_never_falls_back(
    modal_fake: Modal,
    start_worker: Start,
    observer: Client,
    fresh_tenant: str,
    js: JetStreamContext,
) -> None:
    await start_worker()
    # The create takes effect, then every answer of that call is lost (the client's
    # own four attempts): ambiguous. The next delivery finds the sandbox by its name.
    modal_fake.fake.state.fail_after_create.extend(
        GRPCError(Status.DEADLINE_EXCEEDED, "deadline exceeded") for _ in range(4)
    )
    status = await provision(observer, fresh_tenant, "profile.burst-sandbox")
    assert status.state is SandboxState.READY and status.extension_id == "ext.modal", status
    assert list(modal_fake.fake.state.sandboxes) == [status.provider_sandbox_id]  # one
    assert modal_fake.fake.state.calls["SandboxCreateV2"] == 5  # 4 lost answers + 1 exists


async def test_wrong_token_is_rejected_and_never_printed(
    modal_fake: Modal,
    start_worker: Start,
    observer: Client,
    fresh_tenant: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    modal_fake.fake.state.token_secret = "as-rotated-away"  # noqa: S105
    caplog.set_level("DEBUG")
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.modal-gpu")
    assert status.state is SandboxState.FAILED and status.error is not None
    assert status.error.code == "provider_rejected" and "token was refused" in status.error.message
    assert "as-secret" not in status.model_dump_json() and "as-secret" not in caplog.text


async def test_orphan_after_a_worker_kill_is_found_by_tags_and_adopted(
    modal_fake: Modal,
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
    fresh_tenant: str,
) -> None:
    # The create succeeds; the worker is killed while it checks the sandbox is running.
    modal_fake.fake.state.latency_s["SandboxWait"] = 30
    doomed = spawn_worker()
    await observer.provision(
        ProvisionRequest(request_id="crash", tenant=fresh_tenant, profile="profile.modal-gpu")
    )
    for _ in range(400):
        if modal_fake.fake.state.sandboxes:
            break
        await asyncio.sleep(0.05)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    modal_fake.fake.state.latency_s.clear()
    sandbox_id = sandbox_id_for(fresh_tenant, "crash")
    claimed = await observer.status(sandbox_id)
    assert claimed is not None and claimed.state is SandboxState.PROVISIONING

    [found] = await reconcile(settings, js, extension_id="ext.modal")
    assert (found.sandbox_id, found.action) == (sandbox_id, "adopt")
    adopted = await wait_for_state(observer, sandbox_id, SandboxState.READY)
    assert adopted.meter_fields == {
        "cpu_cores": "4",
        "memory_mb": 16384,
        "gpu_type": "H100",
        "gpu_count": 1,
    }

    await start_worker()
    await destroy(observer, adopted)
    assert len(modal_fake.fake.state.sandboxes) == 1 and modal_fake.fake.state.alive() == []
    assert sorted(e["kind"] for e in await meter_events(js, sandbox_id)) == ["started", "stopped"]


async def test_provision_command_against_the_fake(
    modal_fake: Modal,
    start_worker: Start,
    settings: Settings,
    fresh_tenant: str,
    observer: Client,
) -> None:
    """The acceptance command: `sandboxer provision --profile profile.modal-gpu --wait`."""
    await start_worker()
    status = await provision_by_cli(settings, fresh_tenant, "profile.modal-gpu")
    assert status.state is SandboxState.READY and status.extension_id == "ext.modal"
    assert modal_fake.fake.state.sandboxes[status.provider_sandbox_id or ""].gpu == ("H100", 1)
    done = await destroy(observer, status)
    assert done.actual_usd is not None and done.actual_usd > 0


def test_operator_smoke_script_runs_against_the_fake(modal_fake: Modal) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "smoke_modal.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_TOKEN")}
    skipped = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True
    )
    assert skipped.stdout.strip() == "skipped: MODAL_TOKEN_ID and MODAL_TOKEN_SECRET are not set"
    state = modal_fake.fake.state
    ran = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        check=True,
        env={**env, "MODAL_TOKEN_ID": state.token_id, "MODAL_TOKEN_SECRET": state.token_secret},
    )
    assert "found     by its tags" in ran.stdout and "terminated after" in ran.stdout
    assert state.token_secret not in ran.stdout + ran.stderr
    assert len(state.sandboxes) == 1 and state.alive() == []
