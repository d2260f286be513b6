"""The provision -> ready -> meter -> destroy path over a real nats-server."""

from __future__ import annotations

import asyncio
import json
import shutil
from decimal import Decimal
from pathlib import Path

from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings, default_extensions_dir
from schemas import DestroyRequest, ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import Start
from tests.helpers import meter_events, stub_sandboxes, wait_for_state, wait_until_drained


def provision_request(request_id: str = "r1", **fields: object) -> ProvisionRequest:
    return ProvisionRequest.model_validate(
        {"request_id": request_id, "tenant": "acme", "profile": "profile.burst-sandbox", **fields}
    )


async def test_provision_then_destroy_emits_started_and_stopped(
    client: Client, js: JetStreamContext
) -> None:
    ready = await client.provision(provision_request(ttl_s=60), wait_s=15)
    assert ready is not None and ready.state is SandboxState.READY
    assert ready.extension_id == "ext.saas-stub"
    assert ready.provider_sandbox_id and ready.provider_sandbox_id.startswith("stub-")
    assert ready.estimate_usd == Decimal("0.000600")  # 60 s x 0.000010 USD/s
    assert ready.expires_at is not None and ready.ready_at is not None

    destroyed = await client.destroy(
        DestroyRequest(request_id="d1", tenant="acme", sandbox_id=ready.sandbox_id), wait_s=15
    )
    assert destroyed is not None and destroyed.state is SandboxState.DESTROYED
    assert destroyed.actual_usd is not None and destroyed.actual_usd <= ready.estimate_usd

    events = await meter_events(js, ready.sandbox_id)
    assert [e["kind"] for e in events] == ["started", "stopped"]
    started, stopped = events
    assert started["extension_id"] == stopped["extension_id"] == "ext.saas-stub"
    assert started["event_id"] == f"{ready.sandbox_id}.started"
    assert Decimal(stopped["actual_usd"]) == destroyed.actual_usd
    # The bill is the provider's formula applied to the metered duration, exactly.
    assert Decimal(stopped["actual_usd"]) == (
        Decimal(stopped["duration_s"]) * Decimal(stopped["usd_per_second"])
    ).quantize(Decimal("0.000001"))


async def test_replayed_provision_creates_one_sandbox(client: Client, js: JetStreamContext) -> None:
    request = provision_request("replayed")
    for _ in range(5):
        await js.publish("sandbox.provision", request.model_dump_json().encode())
    sandbox_id = sandbox_id_for("acme", "replayed")
    await wait_for_state(client, sandbox_id, SandboxState.READY)
    await wait_until_drained(js, "provisioner-provision")

    assert len(await stub_sandboxes(js)) == 1
    assert [e["kind"] for e in await meter_events(js, sandbox_id)] == ["started"]


async def test_reused_request_id_with_other_body_is_idempotency_conflict(
    client: Client, js: JetStreamContext
) -> None:
    first = await client.provision(provision_request("same-key", ttl_s=60), wait_s=15)
    assert first is not None and first.state is SandboxState.READY

    answer = await client.provision(provision_request("same-key", ttl_s=120), wait_s=15)
    assert answer is not None and answer.state is SandboxState.FAILED
    assert answer.error is not None and answer.error.code is ErrorCode.IDEMPOTENCY_CONFLICT
    # The first request stands, untouched.
    stored = await client.status(first.sandbox_id)
    assert stored is not None and stored.state is SandboxState.READY and stored.error is None


async def test_destroy_twice_and_unknown_sandbox_give_clear_answers(client: Client) -> None:
    ready = await client.provision(provision_request(), wait_s=15)
    assert ready is not None
    destroy = DestroyRequest(request_id="d1", tenant="acme", sandbox_id=ready.sandbox_id)
    first = await client.destroy(destroy, wait_s=15)
    second = await client.destroy(destroy.model_copy(update={"request_id": "d2"}), wait_s=15)
    assert first is not None and second is not None
    assert first.state is second.state is SandboxState.DESTROYED
    assert first.actual_usd == second.actual_usd

    unknown = await client.destroy(
        DestroyRequest(request_id="d3", tenant="acme", sandbox_id="sbx-" + "0" * 24), wait_s=15
    )
    assert unknown is not None and unknown.state is SandboxState.FAILED
    assert unknown.error is not None and unknown.error.code is ErrorCode.NOT_FOUND


async def test_other_tenant_cannot_destroy_a_sandbox(client: Client, js: JetStreamContext) -> None:
    ready = await client.provision(provision_request(), wait_s=15)
    assert ready is not None
    await client.destroy(
        DestroyRequest(request_id="evil", tenant="mallory", sandbox_id=ready.sandbox_id)
    )
    await wait_until_drained(js, "provisioner-destroy")
    stored = await client.status(ready.sandbox_id)
    assert stored is not None and stored.state is SandboxState.READY


async def test_ttl_expiry_destroys_sandbox_and_emits_stopped(
    client: Client, js: JetStreamContext
) -> None:
    ready = await client.provision(provision_request(ttl_s=5), wait_s=15)
    assert ready is not None and ready.state is SandboxState.READY
    destroyed = await wait_for_state(client, ready.sandbox_id, SandboxState.DESTROYED, 20)
    assert destroyed.destroyed_at is not None and ready.expires_at is not None
    assert destroyed.destroyed_at <= ready.expires_at
    kinds = [e["kind"] for e in await meter_events(js, ready.sandbox_id)]
    assert kinds == ["started", "stopped"]
    stub = await js.key_value("sandboxer-stub")
    entry = await stub.get(f"sbx.{ready.provider_sandbox_id}")
    assert entry.value is not None
    record = json.loads(entry.value)
    assert record["terminated_at"] is not None


async def test_hand_written_json_over_raw_nats_reaches_ready(
    client: Client, nc: Nats, js: JetStreamContext
) -> None:
    # What a publisher in another language does: plain JSON, plain subjects.
    sandbox_id = sandbox_id_for("t1", "r1")
    statuses = await nc.subscribe(f"sandbox.status.default.{sandbox_id}")  # t1: no consumer
    await js.publish(
        "sandbox.provision",
        b'{"request_id": "r1", "tenant": "t1", "profile": "profile.burst-sandbox"}',
    )
    states = []
    async with asyncio.timeout(15):
        while "ready" not in states:
            states.append(json.loads((await statuses.next_msg(timeout=None)).data)["state"])
    assert states == ["provisioning", "ready"]


async def test_sandbox_that_never_gets_ready_is_torn_down(
    tmp_path: Path, start_worker: Start, settings: Settings, js: JetStreamContext
) -> None:
    extensions = tmp_path / "extensions"
    shutil.copytree(default_extensions_dir(), extensions)
    stub = (extensions / "ext.saas-stub.yaml").read_text()
    (extensions / "ext.never-ready.yaml").write_text(
        stub.replace("id: ext.saas-stub", "id: ext.never-ready").replace(
            "adapters.saas_stub:SaasStubAdapter", "tests.fake_adapters:NeverReadyAdapter"
        )
    )
    profile = (extensions / "profile.burst-sandbox.yaml").read_text()
    (extensions / "profile.never.yaml").write_text(
        profile.replace("id: profile.burst-sandbox", "id: profile.never").replace(
            "routes: [ext.e2b, ext.modal, ext.saas-stub]", "routes: [ext.never-ready]"
        )
    )
    await start_worker(extensions_dir=extensions)
    async with Client(settings.nats_url) as client:
        failed = await client.provision(
            ProvisionRequest(request_id="boot", tenant="acme", profile="profile.never"), wait_s=15
        )
    assert failed is not None and failed.error is not None
    assert failed.error.code is ErrorCode.PROVIDER_REJECTED
    records = await stub_sandboxes(js)
    assert len(records) == 1 and records[0]["terminated_at"] is not None
