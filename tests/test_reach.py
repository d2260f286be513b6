"""Reachability over real NATS and OpenBao, with E2B and Modal faked at their wire
protocols: an upstream on its own identity, speaking raw nats-py and hand-written JSON,
provisions a sandbox that serves a port, reads where to reach it in `ready`, gets its
credential by request on `sandbox.connect.<its name>.<id>`, and reaches the sandbox's
server with it (and not without). No one else gets the credential, and it is in no
stream, KV entry or log. Then TTL extensions: the hold, the provider's timeout, the
schedule and the debit all move with `expires_at`."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shlex
import shutil
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import hvac
import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from adapters.e2b import E2BRates
from adapters.registry import Registry
from sandboxer.client import Client, ConnectRefused
from sandboxer.credits import Ledger
from sandboxer.dev.fakes.e2b import FakeE2B
from sandboxer.dev.fakes.modal import FakeModal, FakeModalState
from sandboxer.dev.servers import EmbeddedOpenBao, free_port
from sandboxer.money import seconds_between
from sandboxer.settings import BaoSettings, Settings, default_extensions_dir
from sandboxer.topology import CONNECT_SUBJECT_PREFIX, read_subject, stream_configs
from schemas import (
    ConnectGrant,
    Credential,
    ErrorCode,
    ExtendRequest,
    Port,
    Profile,
    SandboxState,
    SandboxStatus,
)
from tests.conftest import OPENBAO_ROOT_TOKEN, ROOT, Start, WorkerHandle
from tests.helpers import destroy, provision, provision_by_cli, sandboxer, wait_for_state
from tests.secure import SecureBus

E2B_PATH, MODAL_PATH = "sandboxer/platform/e2b", "sandboxer/platform/modal"


@dataclass
class Clouds:
    e2b: FakeE2B
    modal: FakeModal
    #: What a worker needs to use them (OpenBao, and where the fakes are).
    changes: dict[str, Any]


@pytest.fixture
def clouds(openbao: EmbeddedOpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    """Fake E2B and Modal, their platform keys in OpenBao; the variables a worker
    started by the test reads, set as an operator would."""
    api_key = f"e2b_{uuid.uuid4().hex}"
    state = FakeModalState(token_id=f"ak-{uuid.uuid4().hex[:8]}", token_secret=uuid.uuid4().hex)
    admin = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)
    kv = admin.secrets.kv.v2
    kv.create_or_update_secret(path=E2B_PATH, secret={"api_key": api_key}, mount_point="secret")
    kv.create_or_update_secret(
        path=MODAL_PATH,
        secret={"token_id": state.token_id, "token_secret": state.token_secret},
        mount_point="secret",
    )
    with FakeE2B(api_keys={api_key}) as e2b, FakeModal(state) as modal:
        adapter_env = {
            "SANDBOXER_E2B_API_URL": e2b.url,
            "SANDBOXER_E2B_TRAFFIC_SCHEME": "http",  # the fakes speak plain HTTP
            "SANDBOXER_MODAL_TUNNEL_SCHEME": "http",
        }
        for name, value in {**adapter_env, "MODAL_SERVER_URL": modal.url}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("MODAL_DISABLE_API_PROXY", "1")
        monkeypatch.setenv("BAO_ADDR", openbao.url)
        monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
        monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
        bao = BaoSettings(addr=openbao.url, token=OPENBAO_ROOT_TOKEN, cache_ttl_s=0)
        yield Clouds(e2b, modal, {"bao": bao, "adapter_env": adapter_env})
    for path in (E2B_PATH, MODAL_PATH):
        kv.delete_metadata_and_all_versions(path=path, mount_point="secret")


# -- an upstream on its own identity --------------------------------------------------


async def _upstream(bus: SecureBus, identity: str) -> Nats:
    """A raw nats-py connection as `identity` (its nkey, its own inbox prefix)."""
    auth = bus.auth(identity)
    assert auth.nkey_seed_file is not None and auth.inbox_prefix is not None
    return await nats.connect(
        bus.server.url,
        nkeys_seed=str(auth.nkey_seed_file),
        inbox_prefix=auth.inbox_prefix,
        allow_reconnect=False,
    )


async def _ready(nc: Nats, consumer: str, body: dict[str, Any]) -> dict[str, Any]:
    """Publish a hand-written provision on the consumer's subject; its settled status."""
    answers = await nc.subscribe(f"sandbox.status.{consumer}.>")
    await nc.jetstream().publish(f"sandbox.provision.{consumer}", json.dumps(body).encode())
    while True:
        status: dict[str, Any] = json.loads((await answers.next_msg(timeout=30)).data)
        if status["request_id"] == body["request_id"] and status["state"] in ("ready", "failed"):
            await answers.unsubscribe()
            return status


async def _ask(nc: Nats, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = await nc.request(subject, json.dumps(body).encode(), timeout=10)
    decoded: dict[str, Any] = json.loads(answer.data)
    return decoded


async def _every_stored_byte(operator: Client) -> list[bytes]:
    """Every message of every stream (KV buckets are streams too)."""
    found = []
    for stream in await operator.js.streams_info():
        assert stream.config.name is not None
        async for _, _, data in read_subject(operator.js, stream.config.name, ">"):
            found.append(data)
    return found


async def test_an_upstream_reaches_its_e2b_sandbox_and_no_one_else_can(
    secure_bus: SecureBus,
    services: Callable[..., Awaitable[WorkerHandle]],
    clouds: Clouds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await services("worker", **clouds.changes)
    acme = await _upstream(secure_bus, "consumer-acme-app")
    body = {"request_id": "web-1", "tenant": "acme", "profile": "profile.web-sandbox"}
    status = await _ready(acme, "acme-app", body)
    assert status["state"] == "ready" and status["extension_id"] == "ext.e2b", status
    sandbox_id, provider_id = status["sandbox_id"], status["provider_sandbox_id"]
    [endpoint] = status["endpoints"]
    host = f"8080-{provider_id}.{clouds.e2b.domain}"
    assert endpoint == {
        "port": 8080,
        "protocol": "http",
        "public": False,
        "url": f"http://{host}",
        "host": host,
        "host_port": None,
        "auth": "header",
        "auth_name": "e2b-traffic-access-token",
        "credential_expires_at": status["expires_at"],
    }
    assert status["control"]["url"] == f"http://49983-{provider_id}.{clouds.e2b.domain}"
    # Private by default: E2B was asked for a sandbox whose ports need the token.
    assert clouds.e2b.sandboxes[provider_id].public is False

    grant = await _ask(acme, f"sandbox.connect.acme-app.{sandbox_id}", {"tenant": "acme"})
    [credential] = grant["credentials"]
    token = credential["secret"]
    assert token == clouds.e2b.sandboxes[provider_id].traffic_token
    assert grant["control"]["secret"] == clouds.e2b.sandboxes[provider_id].envd_token
    assert grant["control_sdk"]["domain"] == clouds.e2b.domain
    async with httpx.AsyncClient(base_url=clouds.e2b.edge.base_url) as http:
        # `url`'s host is a *.localhost name; the request goes to the loopback edge.
        served = await http.get("/", headers={"Host": host, credential["auth_name"]: token})
        refused = await http.get("/", headers={"Host": host})
    assert served.status_code == 200 and served.json()["served_by"] == provider_id
    assert refused.status_code == 403

    # Another upstream: the server refuses its request on acme's subject; on its own
    # subject, acme's sandbox does not exist.
    mallory = await _upstream(secure_bus, "consumer-mallory-app")
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await mallory.request(
            f"sandbox.connect.acme-app.{sandbox_id}", b'{"tenant":"acme"}', timeout=1
        )
    assert any("sandbox.connect.acme-app" in line for line in secure_bus.violations())
    for tenant in ("acme", "mallory"):
        refusal = await _ask(
            mallory, f"sandbox.connect.mallory-app.{sandbox_id}", {"tenant": tenant}
        )
        assert refusal["error"]["code"] == "not_found" and "secret" not in json.dumps(refusal)
    # ... nor may it listen where acme's answers go.
    sneak = await mallory.subscribe("_INBOX.consumer-acme-app.>")
    await mallory.flush()
    await _ask(acme, f"sandbox.connect.acme-app.{sandbox_id}", {"tenant": "acme"})
    with pytest.raises(nats.errors.TimeoutError):
        await sneak.next_msg(timeout=0.5)
    assert any("_INBOX.consumer-acme-app" in line for line in secure_bus.violations())
    await mallory.close()
    await acme.close()

    # Nothing stored holds a token: no stream, no KV entry, no log line.
    secrets_given = [token, grant["control"]["secret"]]
    async with secure_bus.client("operator") as operator:
        stored = await _every_stored_byte(operator)
    assert stored and not [s for s in secrets_given for data in stored if s.encode() in data]
    assert not [s for s in secrets_given if s in caplog.text]


async def test_an_upstream_reaches_its_modal_sandbox_private_and_public_ports(
    secure_bus: SecureBus,
    services: Callable[..., Awaitable[WorkerHandle]],
    clouds: Clouds,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await services("worker", **clouds.changes)
    acme = await _upstream(secure_bus, "consumer-acme-app")
    body = {"request_id": "modal-web-1", "tenant": "acme", "profile": "profile.modal-web"}
    status = await _ready(acme, "acme-app", body)
    assert status["state"] == "ready" and status["extension_id"] == "ext.modal", status
    private, public = status["endpoints"]
    # Only the public port has a tunnel (Modal's are open to anyone with the URL); the
    # private one's URL comes with the token, which Modal mints per asker.
    assert (private["port"], private["url"], private["auth"]) == (8080, None, "bearer")
    assert public["port"] == 3000 and public["auth"] == "none" and public["url"]
    opened = clouds.modal.state.sandboxes[status["provider_sandbox_id"]].definition.open_ports
    assert [p.port for p in opened.ports] == [3000]

    grant = await _ask(acme, f"sandbox.connect.acme-app.{status['sandbox_id']}", {"tenant": "acme"})
    by_port = {c["port"]: c for c in grant["credentials"]}
    assert by_port[3000]["secret"] is None and by_port[3000]["url"] == public["url"]
    token, url = by_port[8080]["secret"], by_port[8080]["url"]
    async with httpx.AsyncClient() as http:
        served = await http.get(url, headers={"Authorization": f"Bearer {token}"})
        refused = await http.get(url)
        tunnel = await http.get(public["url"])
    assert served.status_code == 200 and served.json()["port"] == "8080"
    who = json.loads(served.json()["verified_user_data"])
    assert who == {"tenant": "acme", "sandbox_id": status["sandbox_id"], "requester": "acme-app"}
    assert refused.status_code == 401
    assert tunnel.status_code == 200 and tunnel.json()["port"] == "3000"
    # One port only, on request: one token minted, no other.
    only = await _ask(
        acme, f"sandbox.connect.acme-app.{status['sandbox_id']}", {"tenant": "acme", "port": 8080}
    )
    assert [c["port"] for c in only["credentials"]] == [8080] and only["control"] is None
    await acme.close()

    minted = list(clouds.modal.state.connect_tokens)
    assert len(minted) == 2
    async with secure_bus.client("operator") as operator:
        stored = await _every_stored_byte(operator)
    assert not [t for t in minted for data in stored if t.encode() in data]
    assert not [t for t in minted if t in caplog.text]


async def test_the_official_e2b_sdk_drives_a_sandbox_with_what_connect_hands_out(
    clouds: Clouds, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    """No API key: the envd URL, access token and version of a grant are enough."""
    from e2b import AsyncSandbox, ConnectionConfig
    from packaging.version import Version

    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.web-sandbox")
    grant = await observer.connect(status.sandbox_id, fresh_tenant, status.owner)
    assert grant.control is not None and grant.control.secret is not None
    sdk = grant.control_sdk
    envd_token = grant.control.secret.get_secret_value()

    def sandbox(token: str) -> AsyncSandbox:
        config = ConnectionConfig(
            domain=sdk["domain"],
            # The fake edge is on loopback: the SDK routes by headers, as on e2b.app.
            sandbox_url=clouds.e2b.edge.base_url,
            extra_sandbox_headers={
                "X-Access-Token": token,
                "E2b-Sandbox-Id": sdk["sandbox_id"],
                "E2b-Sandbox-Port": "49983",
            },
        )
        return AsyncSandbox(
            sandbox_id=sdk["sandbox_id"],
            sandbox_domain=sdk["domain"],
            envd_version=Version(sdk["envd_version"]),
            envd_access_token=token,
            traffic_access_token=None,
            connection_config=config,
        )

    assert await sandbox(envd_token).is_running() is True
    with pytest.raises(Exception, match=r"401|access token|Unauthorized"):
        await sandbox("eat_wrong").is_running()


async def test_connect_refuses_what_is_not_a_ready_sandbox_of_the_asker(
    clouds: Clouds, start_worker: Start, observer: Client, fresh_tenant: str
) -> None:
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.web-sandbox")
    with pytest.raises(ConnectRefused) as other_tenant:
        await observer.connect(status.sandbox_id, "someone-else", status.owner)
    assert other_tenant.value.error.code is ErrorCode.NOT_FOUND
    with pytest.raises(ConnectRefused) as no_port:
        await observer.connect(status.sandbox_id, fresh_tenant, status.owner, port=9999)
    assert no_port.value.error.code is ErrorCode.INVALID_REQUEST
    await destroy(observer, status)
    with pytest.raises(ConnectRefused) as gone:
        await observer.connect(status.sandbox_id, fresh_tenant, status.owner)
    assert gone.value.error.code is ErrorCode.INVALID_REQUEST
    assert "destroyed" in gone.value.error.message


def test_no_stream_takes_connect_subjects() -> None:
    """Replies carry secrets; requests must never be stored either (a stream on
    `sandbox.>` would keep every ask, and its inbox)."""
    probe = f"{CONNECT_SUBJECT_PREFIX}.acme-app.sbx-{'0' * 24}"
    for stream in stream_configs(1):
        for subject in stream.subjects or []:
            assert not _matches(subject, probe), (stream.name, subject)


def _matches(pattern: str, subject: str) -> bool:
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or part not in ("*", have[i]):
            return False
    return len(want) == len(have)


# -- live TTL extension ----------------------------------------------------------------


async def _debit_of(js: JetStreamContext, tenant: str, sandbox_id: str) -> Decimal | None:
    subject = f"credits.ledger.{tenant}.debit.debit-{sandbox_id}"
    async for _, _, data in read_subject(js, "CREDITS_LEDGER", subject):
        return Decimal(json.loads(data)["amount_usd"])
    return None


async def test_extend_moves_expiry_provider_timeout_hold_and_schedule_and_bills_exactly(
    clouds: Clouds,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
    fresh_tenant: str,
    settings: Settings,
) -> None:
    await start_worker()
    await start_billing()
    status = await provision(observer, fresh_tenant, "profile.web-sandbox", ttl_s=6)
    assert status.state is SandboxState.READY and status.expires_at is not None
    before = await Ledger(js).balance(fresh_tenant)
    request = ExtendRequest(
        request_id="longer", tenant=fresh_tenant, sandbox_id=status.sandbox_id, add_s=5
    )
    extended = await observer.extend(request, wait_s=20)
    assert extended is not None and extended.error is None, extended
    assert extended.expires_at == status.expires_at + timedelta(seconds=5)
    assert [x.request_id for x in extended.ttl_extensions] == ["longer"]
    assert extended.endpoints and extended.endpoints[0].credential_expires_at == extended.expires_at
    # The hold is the estimate for the whole new lifetime: 11 s of 2 vCPU, 512 MiB.
    rates = E2BRates.model_validate(
        Registry.load(settings.extensions_dir).extensions["ext.e2b"].pricing.rates
    )
    assert extended.estimate_usd == rates.cost(2, 512, Decimal(11))
    after = await Ledger(js).balance(fresh_tenant)
    assert (
        after.holds[status.sandbox_id] == extended.estimate_usd != before.holds[status.sandbox_id]
    )
    # E2B was told the new end (its timeout counts from the call).
    fake = clouds.e2b.sandboxes[status.provider_sandbox_id or ""]
    assert abs((fake.end_at - extended.expires_at).total_seconds()) <= 1.5
    # The same request again changes nothing: no second hold, no later expiry.
    again = await observer.extend(request, wait_s=20)
    assert again is not None and again.expires_at == extended.expires_at
    assert (await Ledger(js).balance(fresh_tenant)).holds == after.holds

    # The TTL destroy fires at the new time, not the old one; the debit is exactly the
    # seconds it ran, at E2B's price.
    await asyncio.sleep(max(0.0, (status.expires_at - datetime.now(UTC)).total_seconds()) + 1.5)
    assert (await observer.status(status.sandbox_id)).state is SandboxState.READY  # type: ignore[union-attr]
    done = await wait_for_state(observer, status.sandbox_id, SandboxState.DESTROYED, 20)
    assert done.destroyed_at is not None and done.started_at is not None
    assert done.destroyed_at >= status.expires_at + timedelta(seconds=4)
    assert done.destroyed_at <= extended.expires_at
    exact = rates.cost(2, 512, seconds_between(done.started_at, done.destroyed_at))
    assert done.actual_usd == exact
    for _ in range(100):
        if (debit := await _debit_of(js, fresh_tenant, status.sandbox_id)) is not None:
            break
        await asyncio.sleep(0.1)
    assert debit == exact


async def test_extend_refusals_change_nothing(
    clouds: Clouds,
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
) -> None:
    await start_worker()
    tenant = f"poor-{uuid.uuid4().hex[:8]}"
    await Ledger(js).grant(tenant, Decimal("0.03"), "a-little")  # 10 min of web-sandbox
    status = await provision(observer, tenant, "profile.web-sandbox", ttl_s=600)
    assert status.state is SandboxState.READY
    held = (await Ledger(js).balance(tenant)).holds

    async def refused(**ask: int) -> SandboxStatus:
        request = ExtendRequest(
            request_id=uuid.uuid4().hex, tenant=tenant, sandbox_id=status.sandbox_id, **ask
        )
        answer = await observer.extend(request, wait_s=20)
        assert answer is not None and answer.error is not None, answer
        return answer

    assert (await refused(ttl_s=3000)).error.code is ErrorCode.INSUFFICIENT_CREDITS  # type: ignore[union-attr]
    assert (await refused(ttl_s=99_999)).error.code is ErrorCode.INVALID_REQUEST  # type: ignore[union-attr]
    assert (await refused(ttl_s=60)).error.code is ErrorCode.INVALID_REQUEST  # type: ignore[union-attr]
    stored = await observer.status(status.sandbox_id)
    assert stored is not None and stored.expires_at == status.expires_at
    assert stored.ttl_extensions == () and stored.error is None
    assert (await Ledger(js).balance(tenant)).holds == held
    fake = clouds.e2b.sandboxes[status.provider_sandbox_id or ""]
    assert abs((fake.end_at - status.expires_at).total_seconds()) <= 1.5  # type: ignore[operator]

    # Modal has no way to extend a running sandbox: refused before anything changes.
    modal = await provision(observer, tenant, "profile.modal-web", ttl_s=30)
    assert modal.state is SandboxState.READY, modal
    request = ExtendRequest(request_id="m", tenant=tenant, sandbox_id=modal.sandbox_id, add_s=30)
    answer = await observer.extend(request, wait_s=20)
    assert answer is not None and answer.error is not None
    assert answer.error.code is ErrorCode.PROVIDER_REJECTED
    assert (await observer.status(modal.sandbox_id)).expires_at == modal.expires_at  # type: ignore[union-attr]


async def test_extend_on_the_stub_moves_its_record(
    start_worker: Start, observer: Client, js: JetStreamContext, fresh_tenant: str
) -> None:
    await start_worker()
    status = await provision(observer, fresh_tenant, "profile.burst-sandbox", ttl_s=60)
    assert status.extension_id == "ext.saas-stub"
    request = ExtendRequest(
        request_id="x", tenant=fresh_tenant, sandbox_id=status.sandbox_id, ttl_s=120
    )
    extended = await observer.extend(request, wait_s=20)
    assert extended is not None and extended.expires_at == status.created_at + timedelta(
        seconds=120
    )
    from tests.helpers import stub_sandboxes

    [record] = [
        r
        for r in await stub_sandboxes(js)
        if r["provider_sandbox_id"] == status.provider_sandbox_id
    ]
    assert datetime.fromisoformat(record["expires_at"]) == extended.expires_at


# -- the pieces ------------------------------------------------------------------------


async def test_a_profile_with_ports_skips_providers_that_serve_none(settings: Settings) -> None:
    """Without E2B and Modal keys, web-sandbox has no route: the stub serves no ports,
    so a sandbox that could never be reached is never made (and never billed)."""
    from adapters.routing import Router

    registry = Registry.load(settings.extensions_dir)
    adapters = registry.build_adapters(settings, None)
    explained = await Router(adapters, registry.extensions).explain(
        registry.profile("profile.burst-sandbox").model_copy(update={"ports": [Port(port=8080)]}),
        "acme",
    )
    assert explained.chosen is None
    assert ("ext.saas-stub", "no_ports: its sandboxes serve no ports") in explained.rows


def test_ports_and_credentials_keep_their_secrets_and_shape() -> None:
    with pytest.raises(ValueError, match="repeat"):
        Profile.model_validate(
            {
                **Registry.load(default_extensions_dir())
                .profile("profile.web-sandbox")
                .model_dump(),
                "ports": [{"port": 80}, {"port": 80, "protocol": "https"}],
            }
        )
    value = "s3cr3t-value"
    credential = Credential(port=1, url="http://x", auth="bearer", secret=value)
    assert value not in repr(credential) and value not in str(credential)
    assert json.loads(credential.model_dump_json())["secret"] == value
    with pytest.raises(ValueError, match="secret exactly when"):
        Credential(port=1, auth="none", secret=value)
    grant = ConnectGrant(sandbox_id=f"sbx-{'a' * 24}", credentials=[credential])
    assert value not in repr(grant)


def test_only_the_owner_may_ask_and_only_workers_answer() -> None:
    from sandboxer.access import authorization_conf, permissions

    acme = permissions("consumer-acme-app")
    assert f"{CONNECT_SUBJECT_PREFIX}.acme-app.*" in acme.publish
    assert not [s for s in acme.publish if s.startswith(CONNECT_SUBJECT_PREFIX) and "acme" not in s]
    worker = permissions("worker")
    assert worker.allow_responses and f"{CONNECT_SUBJECT_PREFIX}.*.*" in worker.subscribe
    assert not permissions("billing").allow_responses
    conf = authorization_conf({"worker": "UWORKER", "billing": "UBILLING"})
    assert conf.count("allow_responses: true") == 1


# -- the README's walk-through -------------------------------------------------------


async def test_on_dev_connect_prints_a_curl_line_that_reaches_each_provider(
    tmp_path: Path,
) -> None:
    """`sandboxer dev --fake-e2b --fake-modal`; in another process `provision --wait`
    and `connect`: each curl line reaches the sandbox's port, and without its
    credential the port refuses."""
    state, log = tmp_path / "state", tmp_path / "dev.log"
    with log.open("wb") as sink:
        dev = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "sandboxer", "dev", "--fake-e2b", "--fake-modal"),
            *("--port", str(free_port()), "--state-dir", str(state)),
            stdout=sink,
            stderr=sink,
            cwd=ROOT,
        )
    try:
        for _ in range(600):
            if "Ctrl-C" in log.read_text() or dev.returncode is not None:
                break
            await asyncio.sleep(0.05)
        said = log.read_text()
        assert "sandboxer connect <sandbox_id>" in said, said
        shell = dict(line.split("=", 1) for line in (state / "dev.env").read_text().splitlines())
        where = Settings(nats_url=shell["SANDBOXER_NATS_URL"])
        for profile, extension, ports in (
            ("profile.web-sandbox", "ext.e2b", ["8080"]),
            ("profile.modal-web", "ext.modal", ["8080", "3000"]),
        ):
            ready = await provision_by_cli(where, "demo", profile)
            assert ready.extension_id == extension, ready
            code, out, err = await sandboxer(where, "connect", ready.sandbox_id)
            assert code == 0, err
            lines = [line.strip() for line in out.splitlines() if line.strip().startswith("curl ")]
            assert len(lines) == len(ports), out
            for line, port in zip(lines, ports, strict=True):
                page = await _curl(shlex.split(line))
                assert page["status"] == 200 and page["body"]["port"] == port, (line, page)
                assert page["body"]["served_by"] == ready.provider_sandbox_id
                if "-H" in line:  # private: without the credential, refused
                    bare = await _curl(["curl", shlex.split(line)[-1]])
                    assert bare["status"] in (401, 403), (line, bare)
    finally:
        dev.send_signal(signal.SIGINT)
        await asyncio.wait_for(dev.wait(), 90)


async def _curl(argv: list[str]) -> dict[str, Any]:
    """Run a `curl [-H 'Name: value'] URL` line: with curl if this machine has it (it
    resolves *.localhost to loopback itself), else the same request with httpx."""
    if shutil.which("curl"):
        done = await asyncio.create_subprocess_exec(
            *argv, "-s", "-w", "\n%{http_code}", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await done.communicate()
        body, _, status = out.decode().rpartition("\n")
        return {"status": int(status), "body": json.loads(body)}
    headers = dict(value.split(": ", 1) for flag, value in itertools.pairwise(argv) if flag == "-H")
    url = httpx.URL(argv[-1])
    host = url.host
    if host.endswith(".localhost"):  # RFC 6761: *.localhost is loopback
        headers["Host"] = f"{host}:{url.port}"
        url = url.copy_with(host="127.0.0.1")
    async with httpx.AsyncClient() as http:
        answer = await http.get(url, headers=headers)
    return {"status": answer.status_code, "body": answer.json()}
