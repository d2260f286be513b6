"""The trust boundary, over a real nats-server started with the configuration that
`sandboxer security generate` writes: every process on its own least-privilege
identity, and the attacks of an upstream on the same bus refused, by the server
(a permissions violation in its log, nothing stored) or by the code (say which)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from sandboxer import access
from sandboxer.credits import Ledger
from sandboxer.ids import sandbox_id_for
from schemas import DestroyRequest, ErrorCode, ProvisionRequest, SandboxState
from tests.conftest import ROOT, WorkerHandle
from tests.fake_finhub import FakeFinHub
from tests.helpers import stream_messages
from tests.secure import CONSUMERS, SecureBus


def _request(tenant: str, **fields: Any) -> ProvisionRequest:
    return ProvisionRequest(
        request_id=uuid.uuid4().hex, tenant=tenant, profile="profile.burst-sandbox", **fields
    )


async def _published(nc: Nats, subject: str, body: bytes) -> None:
    """A core publish, flushed: a refused one is dropped by the server (and logged)."""
    await nc.publish(subject, body)
    await nc.flush()
    await asyncio.sleep(0.2)


# -- what works ----------------------------------------------------------------------


async def test_every_role_works_end_to_end_on_its_own_identity(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    with FakeFinHub() as hub:
        await services("worker")
        await services("billing")
        await services("exporter", fin_hub_url=hub.url)
        async with secure_bus.client("consumer-acme-app") as upstream:
            ready = await upstream.provision(_request("acme"), wait_s=20)
            assert ready is not None and ready.state is SandboxState.READY, ready
            assert ready.owner == "acme-app"
            assert (await upstream.status(ready.sandbox_id)) == ready  # its own: readable
            destroy = DestroyRequest(request_id="d1", tenant="acme", sandbox_id=ready.sandbox_id)
            done = await upstream.destroy(destroy, wait_s=20)
            assert done is not None and done.state is SandboxState.DESTROYED
        for _ in range(200):
            if hub.accepted:
                break
            await asyncio.sleep(0.05)
        [record] = hub.accepted.values()
        async with secure_bus.client("operator") as operator:
            entries = await Ledger(operator.js).entries("acme")
        [debit] = [e for e in entries if e.kind == "debit"]
        assert record["sandbox_id"] == ready.sandbox_id
        assert Decimal(record["actual_usd"]) == debit.amount_usd == done.actual_usd
    assert secure_bus.violations() == []  # nobody needed more than its role allows


async def test_an_upstream_for_a_tenant_it_does_not_own_is_forbidden_by_the_code(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    await services("worker")
    async with secure_bus.client("consumer-mallory-app") as mallory:
        request = _request("acme")
        answer = await mallory.provision(request, wait_s=20)
        assert answer is not None and answer.state is SandboxState.FAILED
        assert answer.error is not None and answer.error.code is ErrorCode.FORBIDDEN
    async with secure_bus.client("operator") as operator:
        sandbox_id = sandbox_id_for("acme", request.request_id)
        assert await operator.status(sandbox_id) is None  # nothing stored: acme's id is free
        assert not [e for e in await Ledger(operator.js).entries("acme") if e.kind == "hold"]
        # acme's own consumer can still use that request id.
    async with secure_bus.client("consumer-acme-app") as upstream:
        ready = await upstream.provision(request, wait_s=20)
        assert ready is not None and ready.state is SandboxState.READY


async def test_destroying_another_tenants_sandbox_is_forbidden_or_not_found(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    await services("worker")
    async with secure_bus.client("consumer-acme-app") as acme:
        ready = await acme.provision(_request("acme"), wait_s=20)
        assert ready is not None and ready.state is SandboxState.READY
    async with secure_bus.client("consumer-mallory-app") as mallory:
        # Naming acme: refused by the code. Naming herself: no such sandbox of hers.
        for tenant, code in (("acme", ErrorCode.FORBIDDEN), ("mallory", ErrorCode.NOT_FOUND)):
            request = DestroyRequest(
                request_id=f"x-{tenant}", tenant=tenant, sandbox_id=ready.sandbox_id
            )
            answer = await mallory.destroy(request, wait_s=20)
            assert answer is not None and answer.error is not None and answer.error.code is code
    async with secure_bus.client("operator") as operator:
        still = await operator.status(ready.sandbox_id)
        assert still is not None and still.state is SandboxState.READY


# -- what the server refuses ----------------------------------------------------------


async def test_an_upstream_can_write_no_money_and_no_event(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    await services("worker")
    await services("billing")
    async with secure_bus.client("consumer-acme-app") as acme:
        ready = await acme.provision(_request("acme"), wait_s=20)
        assert ready is not None
    attacks = {
        # subject: body, as a raw client of the same bus would send them
        "credits.ledger.mallory.grant.grant-x": {"kind": "grant", "amount_usd": "1000000"},
        "credits.ledger.acme.debit.debit-x": {"kind": "debit", "amount_usd": "99"},
        f"credits.ledger.acme.release.release-{ready.sandbox_id}": {"kind": "release"},
        "sandbox.meter.ext.saas-stub": {"event_id": f"{ready.sandbox_id}.stopped"},
        "billing.usage": {"record_id": f"usage-{ready.sandbox_id}"},
        "sandbox.provision": {"tenant": "acme"},  # the trusted plain subject
        "sandbox.provision.acme-app": {"tenant": "acme"},  # another consumer's
        "sandbox.destroy": {"tenant": "acme", "sandbox_id": ready.sandbox_id},
        f"$KV.sandboxer-status.acme-app.{ready.sandbox_id}": {"state": "destroyed"},
    }
    mallory = await secure_bus.connect("consumer-mallory-app")
    try:
        for subject, body in attacks.items():
            await _published(mallory, subject, json.dumps(body).encode())
    finally:
        await mallory.close()
    refused = secure_bus.violations()
    for subject in attacks:
        assert any(f'Publish Violation - Subject "{subject}"' in line for line in refused), subject
    async with secure_bus.client("operator") as operator:
        assert (await Ledger(operator.js).balance("mallory")).balance == Decimal("100")
        acme_balance = await Ledger(operator.js).balance("acme")
        assert acme_balance.balance == Decimal("100") and ready.sandbox_id in acme_balance.holds
        assert [s for s, _ in await stream_messages(operator.js, "BILLING")] == []
        still = await operator.status(ready.sandbox_id)
        assert still is not None and still.state is SandboxState.READY


async def test_an_upstream_reads_no_one_elses_status(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    await services("worker")
    mallory = await secure_bus.connect("consumer-mallory-app")
    seen: list[bytes] = []

    async def spy(message: Any) -> None:
        seen.append(message.data)

    await mallory.subscribe("sandbox.status.>", cb=spy)
    await mallory.subscribe("sandbox.status.acme-app.>", cb=spy)
    await mallory.flush()
    async with secure_bus.client("consumer-acme-app") as acme:
        ready = await acme.provision(_request("acme"), wait_s=20)
        assert ready is not None
    key = f"$KV.sandboxer-status.acme-app.{ready.sandbox_id}"
    await _published(mallory, f"$JS.API.DIRECT.GET.KV_sandboxer-status.{key}", b"")
    await _published(mallory, "$JS.API.STREAM.INFO.KV_sandboxer-status", b"")
    await mallory.close()
    assert seen == []
    refused = "\n".join(secure_bus.violations())
    assert 'Subscription Violation - Subject "sandbox.status.>"' in refused
    assert 'Subscription Violation - Subject "sandbox.status.acme-app.>"' in refused
    assert f'Publish Violation - Subject "$JS.API.DIRECT.GET.KV_sandboxer-status.{key}"' in refused


# -- what the code refuses ------------------------------------------------------------


async def test_events_and_records_that_disagree_with_the_records_are_not_billed(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    """Published by identities allowed to publish there (a worker, an operator's
    replay), well-formed, but wrong: billing and the exporter check their own records."""
    with FakeFinHub() as hub:
        await services("worker")
        await services("billing")
        await services("exporter", fin_hub_url=hub.url)
        async with secure_bus.client("consumer-acme-app") as acme:
            ready = await acme.provision(_request("acme"), wait_s=20)
            assert ready is not None and ready.state is SandboxState.READY
        base = {
            "kind": "stopped",
            "extension_id": "ext.saas-stub",
            "tenant": "acme",
            "profile": "profile.burst-sandbox",
            "provider_sandbox_id": ready.provider_sandbox_id,
            "started_at": "2026-01-01T00:00:00Z",
            "stopped_at": "2026-01-01T00:10:00Z",
            "duration_s": "600.000",
            "estimate_usd": "0.009000",
            "actual_usd": "0.400000",
            "usd_per_second": "0.000010",
        }
        never = f"sbx-{'b' * 24}"
        forged = [
            {**base, "sandbox_id": never, "event_id": f"{never}.stopped"},  # no such sandbox
            {**base, "sandbox_id": ready.sandbox_id, "event_id": "forged.stopped"},  # not stopped
        ]
        worker = await secure_bus.connect("worker")
        operator = await secure_bus.connect("operator")
        try:
            for event in forged:
                await worker.jetstream().publish(
                    "sandbox.meter.ext.saas-stub", json.dumps(event).encode()
                )
            record = {
                "record_id": f"usage-{never}",
                "sandbox_id": never,
                "extension_id": "ext.saas-stub",
                "tenant": "acme",
                "duration_s": "60",
                "actual_usd": "0.400000",
                "provider_cost_usd": "0.400000",
                "started_at": "2026-01-01T00:00:00Z",
                "stopped_at": "2026-01-01T00:01:00Z",
            }
            await operator.jetstream().publish("billing.usage", json.dumps(record).encode())
            for _ in range(300):
                letters = [b async for b in _dead_letters(operator.jetstream())]
                if len(letters) >= 3:
                    break
                await asyncio.sleep(0.05)
        finally:
            await worker.close()
            await operator.close()
        reasons = "\n".join(letters)
        assert "names no stopped sandbox" in reasons and "billing never published it" in reasons
        async with secure_bus.client("operator") as op:
            assert not [e for e in await Ledger(op.js).entries("acme") if e.kind == "debit"]
        assert hub.accepted == {}


async def _dead_letters(js: JetStreamContext) -> AsyncIterator[str]:
    from consumers.deadletter import list_dead_letters

    for letter in await list_dead_letters(js):
        yield letter.reason


async def test_a_junk_journal_entry_breaks_no_tenant(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    """Even from an identity allowed to write holds (a worker's): the fold skips it."""
    await services("worker")
    worker = await secure_bus.connect("worker")
    try:
        js = worker.jetstream()
        await js.publish("credits.ledger.t1.hold.junk", b"junk")
        entry = {  # a grant, written where holds go
            "entry_id": "grant-free",
            "kind": "grant",
            "tenant": "t1",
            "amount_usd": "5",
            "at": "2026-01-01T00:00:00Z",
        }
        await js.publish("credits.ledger.t1.hold.grant-free", json.dumps(entry).encode())
    finally:
        await worker.close()
    async with secure_bus.client("operator") as operator:
        balance = await Ledger(operator.js).balance("t1")
        assert balance.balance == Decimal("100")
        ready = await operator.provision(_request("t1"), wait_s=20)
        assert ready is not None and ready.state is SandboxState.READY


# -- a process that cannot work exits -------------------------------------------------


async def test_a_worker_whose_key_is_revoked_exits_non_zero(
    secure_bus: SecureBus, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", "worker"],
            env={**secure_bus.env("worker"), "SANDBOXER_RECONCILE_EVERY_S": "0"},
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    try:
        for _ in range(200):
            if "ready:" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert "ready:" in log.read_text(), log.read_text()
        # The operator rotates the worker's key and reloads the server: the running
        # worker's identity is refused from now on.
        access.generate(secure_bus.keys, [*CONSUMERS, "demo-app"], rotate=("worker",))
        assert secure_bus.server.process is not None
        secure_bus.server.process.send_signal(signal.SIGHUP)
        code = await asyncio.to_thread(worker.wait, 30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert code == 1, log.read_text()
    assert "closed for good" in log.read_text()


# -- nothing leaks --------------------------------------------------------------------


async def test_no_key_in_any_log_line(
    secure_bus: SecureBus,
    services: Callable[..., Awaitable[WorkerHandle]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await services("worker")
    await services("billing")
    async with secure_bus.client("consumer-acme-app") as acme:
        ready = await acme.provision(_request("acme"), wait_s=20)
        assert ready is not None
        await acme.destroy(
            DestroyRequest(request_id="d", tenant="acme", sandbox_id=ready.sandbox_id), wait_s=20
        )
    seeds = [p.read_text().strip() for p in secure_bus.keys.glob("*.nk")]
    assert seeds and all(seed.startswith("SU") for seed in seeds)
    assert not [seed for seed in seeds if seed in caplog.text]
    async with secure_bus.client("operator") as operator:
        for stream in await operator.js.streams_info():
            assert stream.config.name is not None
            async for _, _, data in _read(operator.js, stream.config.name):
                assert not [seed for seed in seeds if seed.encode() in data]


async def _read(js: JetStreamContext, stream: str) -> AsyncIterator[tuple[int, str, bytes]]:
    from sandboxer.topology import read_subject

    async for item in read_subject(js, stream, ">"):
        yield item


async def test_anonymous_clients_are_turned_away(secure_bus: SecureBus) -> None:
    with pytest.raises(Exception):  # noqa: B017, PT011 - nats-py's auth error types vary
        await nats.connect(secure_bus.server.url, allow_reconnect=False, connect_timeout=2)


async def test_the_cli_runs_as_an_upstream_identity(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    await services("worker")
    env = secure_bus.env("consumer-acme-app")
    command = [
        *(sys.executable, "-m", "sandboxer", "provision", "--tenant", "acme"),
        *("--profile", "profile.burst-sandbox", "--wait", "--json"),
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert json.loads(out)["owner"] == "acme-app"


async def test_only_an_operator_asks_for_template_builds_and_the_worker_needs_no_more(
    secure_bus: SecureBus, services: Callable[..., Awaitable[WorkerHandle]]
) -> None:
    if shutil.which("packer") is None:
        pytest.skip("packer is not installed (`make check` installs Debian's packer package)")
    await services("templates", template_poll_s=0.1)

    async def cli(identity: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sandboxer", "template", "build", "python-web"),
            env=secure_bus.env(identity),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode or 0, (out + err).decode()

    code, said = await cli("consumer-acme-app")
    assert code == 1 and "template.build was not accepted" in said, said
    violations = secure_bus.violations()
    assert violations and all("template." in line for line in violations)
    # The operator's build runs: the stub gets it (E2B and Modal have no key here).
    code, said = await cli("operator")
    assert "register: ext.saas-stub: ready" in said, said
    assert "ext.saas-stub=ready" in said and code == 1  # not ready everywhere: exit 1
    assert secure_bus.violations() == violations  # the template worker needed no more
