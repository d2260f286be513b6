"""Credential-aware routing over a real OpenBao and a real NATS: the tenant's own key
wins, the platform key comes next, the stub needs none; keys never leak."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import hvac
import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings, default_extensions_dir
from sandboxer.topology import read_subject
from schemas import DestroyRequest, ProvisionRequest, SandboxState, SandboxStatus, byok_path
from tests.conftest import OPENBAO_ROOT_TOKEN, Start
from tests.fake_adapters import fingerprint
from tests.helpers import meter_events, stream_messages, stub_sandboxes, wait_for_status


@pytest.fixture
def platform_path() -> str:
    return f"sandboxer/platform/e2b-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def admin(openbao: EmbeddedOpenBao) -> hvac.Client:
    return hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)


@pytest.fixture
async def keyed_worker(
    tmp_path: Path,
    platform_path: str,
    openbao: EmbeddedOpenBao,
    start_worker: Start,
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """A worker whose profile.burst-sandbox starts with a keyed `ext.e2b` stand-in."""
    extensions = tmp_path / "extensions"
    shutil.copytree(default_extensions_dir(), extensions)
    (extensions / "ext.e2b.yaml").write_text(
        f"""kind: extension
id: ext.e2b
name: E2B stand-in for routing tests
adapter: tests.fake_adapters:KeyedStubAdapter
pricing: {{pricing_model: metered, rates: {{usd_per_second: "0.000020"}}}}
secret_ref: {{mount: secret, path: {platform_path}, keys: [api_key]}}
"""
    )
    monkeypatch.setenv("BAO_ADDR", openbao.url)
    monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
    monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
    return await start_worker(extensions_dir=extensions)


def put(admin: hvac.Client, path: str, api_key: str) -> None:
    admin.secrets.kv.v2.create_or_update_secret(
        path=path, secret={"api_key": api_key}, mount_point="secret"
    )


async def provision(settings: Settings, tenant: str) -> SandboxStatus:
    async with Client(settings.nats_url) as client:
        status = await client.provision(
            ProvisionRequest(
                request_id=uuid.uuid4().hex, tenant=tenant, profile="profile.burst-sandbox"
            ),
            wait_s=20,
        )
    assert status is not None and status.state is SandboxState.READY, status
    return status


async def destroy(settings: Settings, status: SandboxStatus) -> SandboxStatus:
    async with Client(settings.nats_url) as client:
        done = await client.destroy(
            DestroyRequest(
                request_id=uuid.uuid4().hex, tenant=status.tenant, sandbox_id=status.sandbox_id
            ),
            wait_s=20,
        )
    assert done is not None and done.state is SandboxState.DESTROYED, done
    return done


async def used_key(js: JetStreamContext, status: SandboxStatus, op: str) -> str:
    stub = await js.key_value("sandboxer-stub")
    entry = await stub.get(f"fingerprint.{status.provider_sandbox_id}.{op}")
    return (entry.value or b"").decode()


async def test_platform_key_routes_to_the_first_extension(
    keyed_worker: Any,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
    platform_path: str,
) -> None:
    put(admin, platform_path, "platform-key-placeholder")
    status = await provision(settings, "acme")
    assert status.extension_id == "ext.e2b" and status.credential_source == "platform"
    assert status.credential_path == f"secret/{platform_path}"
    assert status.credential_version == 1
    assert await used_key(js, status, "create") == fingerprint("platform-key-placeholder")
    await destroy(settings, status)
    events = await meter_events(js, status.sandbox_id)
    assert {(e["extension_id"], e["credential_source"]) for e in events} == {
        ("ext.e2b", "platform")
    }


async def test_tenant_key_wins_and_is_recorded_as_byok(
    keyed_worker: Any,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
    platform_path: str,
) -> None:
    put(admin, platform_path, "platform-key-placeholder")
    put(admin, byok_path("t1", "ext.e2b"), "t1-own-key-placeholder")
    status = await provision(settings, "t1")
    assert status.credential_source == "byok"
    assert status.credential_path == "secret/sandboxer/tenants/t1/ext.e2b"
    assert await used_key(js, status, "create") == fingerprint("t1-own-key-placeholder")
    other = await provision(settings, "acme")  # acme has no key of its own
    assert await used_key(js, other, "create") == fingerprint("platform-key-placeholder")


async def test_no_key_anywhere_falls_back_to_the_stub(
    keyed_worker: Any, settings: Settings
) -> None:
    status = await provision(settings, "acme")
    assert status.extension_id == "ext.saas-stub" and status.credential_source == "none"
    assert status.credential_path is None


async def test_key_rotated_between_create_and_destroy(
    keyed_worker: Any,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
    platform_path: str,
) -> None:
    put(admin, platform_path, "key-v1-placeholder")
    first = await provision(settings, "acme")
    second = await provision(settings, "acme")
    put(admin, platform_path, "key-v2-placeholder")  # rotation
    await destroy(settings, first)  # the version recorded at create still exists
    assert await used_key(js, first, "destroy") == fingerprint("key-v1-placeholder")
    admin.secrets.kv.v2.destroy_secret_versions(
        path=platform_path, versions=[1], mount_point="secret"
    )
    await destroy(settings, second)  # v1 is gone: the current key is used
    assert await used_key(js, second, "destroy") == fingerprint("key-v2-placeholder")


async def test_no_secret_value_anywhere_in_nats_or_logs(
    keyed_worker: Any,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
    platform_path: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    secrets = ["leak-canary-platform-7f3a", "leak-canary-byok-91c2"]
    put(admin, platform_path, secrets[0])
    put(admin, byok_path("t1", "ext.e2b"), secrets[1])
    caplog.set_level("DEBUG")
    for tenant in ("acme", "t1"):
        await destroy(settings, await provision(settings, tenant))
    scanned = 0
    for stream in await js.streams_info():
        assert stream.config.name is not None
        async for _, subject, data in read_subject(js, stream.config.name, ">"):
            scanned += 1
            for secret in secrets:
                assert secret.encode() not in data, f"{secret} found on {subject}"
    assert scanned > 10
    assert not any(secret in caplog.text for secret in secrets)
    assert json.dumps(caplog.text)  # logs were captured at all


async def test_route_explain_shows_the_decision_and_no_key(
    keyed_worker: Any,
    settings: Settings,
    admin: hvac.Client,
    platform_path: str,
    openbao: EmbeddedOpenBao,
) -> None:
    async def explain(tenant: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandboxer",
            "route",
            "explain",
            "--tenant",
            tenant,
            "--profile",
            "profile.burst-sandbox",
            env={
                **os.environ,
                "SANDBOXER_NATS_URL": settings.nats_url,
                "SANDBOXER_EXTENSIONS_DIR": str(keyed_worker.settings.extensions_dir),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out.decode()

    nothing = await explain("acme")
    assert "ext.e2b          no key: neither the tenant's nor the platform's" in nothing
    assert "ext.modal        no key: neither the tenant's nor the platform's" in nothing
    assert "ext.saas-stub    CHOSEN (needs no key)" in nothing
    tenant = f"explain-{uuid.uuid4().hex[:8]}"  # OpenBao is shared by the session
    put(admin, byok_path(tenant, "ext.e2b"), "explain-canary-byok")
    byok = await explain(tenant)
    assert (
        f"ext.e2b          CHOSEN (byok key secret/sandboxer/tenants/{tenant}/ext.e2b v1)" in byok
    )
    assert "ext.saas-stub    not tried" in byok
    assert "explain-canary" not in byok


async def test_openbao_outage_delays_requests_and_loses_none(
    tmp_path: Path,
    platform_path: str,
    openbao: EmbeddedOpenBao,
    admin: hvac.Client,
    start_worker: Start,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    keyed_worker: Any,
) -> None:
    put(admin, platform_path, "outage-canary-key")
    await keyed_worker.stop()
    monkeypatch.setenv("SANDBOXER_BAO_TIMEOUT_S", "0.3")
    await start_worker(extensions_dir=keyed_worker.settings.extensions_dir, max_deliver=30)
    with openbao.frozen():
        async with Client(settings.nats_url) as client:
            requests = [
                ProvisionRequest(request_id=f"o{i}", tenant="acme", profile="profile.burst-sandbox")
                for i in range(5)
            ]
            for request in requests:
                await client.provision(request)
            await asyncio.sleep(2.0)  # every request is tried and retried meanwhile
            assert "OpenBao at" in caplog.text and "unreachable" in caplog.text
    async with Client(settings.nats_url) as client:
        for request in requests:
            status = await wait_for_status(
                client, sandbox_id_for("acme", request.request_id), timeout_s=30
            )
            assert status.state is SandboxState.READY and status.extension_id == "ext.e2b"
    assert "outage-canary-key" not in caplog.text


async def test_byok_sandbox_holds_and_debits_no_credits(
    keyed_worker: Any,
    start_billing: Start,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
) -> None:
    tenant = "t1"  # funded, so a hold would have been possible
    put(admin, byok_path(tenant, "ext.e2b"), "byok-billing-placeholder")
    # Billing prices with the same extensions as the workers.
    await start_billing(fin_hub_url=None, extensions_dir=keyed_worker.settings.extensions_dir)
    status = await provision(settings, tenant)
    assert status.credential_source == "byok"
    await asyncio.sleep(1.0)  # so the sandbox costs something at provider prices
    await destroy(settings, status)

    async def recorded() -> list[dict[str, Any]]:
        return [
            body
            for _, body in await stream_messages(js, "BILLING", "billing.usage")
            if body["sandbox_id"] == status.sandbox_id
        ]

    for _ in range(200):
        if await recorded():
            break
        await asyncio.sleep(0.05)
    (record,) = await recorded()
    assert record["credential_source"] == "byok" and record["actual_usd"] == "0.000000"
    assert Decimal(record["provider_cost_usd"]) > 0
    # No credit is held or debited; a zero hold counted it against the tenant's limits
    # (docs/policy.md) while it ran, and billing released it.
    entries = [e for e in await Ledger(js).entries(tenant) if e.sandbox_id == status.sandbox_id]
    assert [(e.kind, e.amount_usd) for e in entries] == [
        ("hold", Decimal(0)),
        ("release", Decimal(0)),
    ]


async def test_a_refusal_before_creation_falls_back_to_the_next_route(
    keyed_worker: Any,
    start_worker: Start,
    settings: Settings,
    js: JetStreamContext,
    admin: hvac.Client,
    platform_path: str,
) -> None:
    put(admin, platform_path, "fallback-placeholder")
    await keyed_worker.stop()
    manifest = keyed_worker.settings.extensions_dir / "ext.e2b.yaml"
    manifest.write_text(manifest.read_text() + "config: {reject_rate: 1}\n")  # refuses all
    await start_worker(extensions_dir=keyed_worker.settings.extensions_dir)

    status = await provision(settings, "acme")
    assert status.extension_id == "ext.saas-stub" and status.credential_source == "none"
    assert status.estimate_usd == Decimal("0.009000")  # the stub's price, not E2B's
    stub_records = [
        r
        for r in await stub_sandboxes(js)
        if r["tags"]["sandboxer_sandbox_id"] == status.sandbox_id
    ]
    assert len(stub_records) == 1  # one sandbox, made by the route that accepted
    ledger = Ledger(js)
    holds = [
        (e.entry_id, e.amount_usd)
        for e in await ledger.entries("acme")
        if e.sandbox_id == status.sandbox_id
    ]
    assert holds == [
        (f"hold-{status.sandbox_id}", Decimal("0.018000")),  # ext.e2b, route 1
        (f"hold-{status.sandbox_id}-r3", Decimal("0.009000")),  # ext.saas-stub, route 3
    ]
    assert (await ledger.balance("acme")).holds[status.sandbox_id] == Decimal("0.009000")
