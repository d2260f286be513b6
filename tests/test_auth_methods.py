"""Every way a process can prove who it is to nats-server works end to end: a worker
(its own connection and FastStream's) and a client, on a server that requires it."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import nkeys
import pytest
import trustme

from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.servers import EmbeddedNats
from sandboxer.settings import NatsAuth, Settings
from schemas import ProvisionRequest, SandboxState
from tests.conftest import WorkerHandle


@dataclass
class Secured:
    """A server configured one way, and the identity that gets in."""

    config: str
    auth: NatsAuth


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(secrets.token_bytes(32), prefix)))


def _jwt(signer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object]) -> str:
    """A NATS JWT (ed25519-nkey), as `nsc` writes them."""
    claims: dict[str, object] = {
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = _b64(signer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def decentralized(tmp: Path) -> Secured:
    """Operator mode: an operator, an account with JetStream, a user and its creds."""
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    operator_jwt = _jwt(operator, operator.public_key.decode(), "op", {"type": "operator"})
    unlimited = {
        **{limit: -1 for limit in ("subs", "data", "payload", "conn", "leaf", "imports")},
        "exports": -1,
        "wildcards": True,
    }
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    account_jwt = _jwt(
        operator,
        account.public_key.decode(),
        "sandboxer",
        {"type": "account", "limits": {**unlimited, **jetstream}},
    )
    system_jwt = _jwt(operator, system.public_key.decode(), "SYS", {"type": "account"})
    user_jwt = _jwt(
        account,
        user.public_key.decode(),
        "worker",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = tmp / "worker.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    preload = {system.public_key.decode(): system_jwt, account.public_key.decode(): account_jwt}
    config = (
        f"operator: {operator_jwt}\n"
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{ {', '.join(f'{k}: {v}' for k, v in preload.items())} }}\n"
    )
    return Secured(config, NatsAuth(creds_file=creds))


def tls(tmp: Path) -> Secured:
    """Server and client certificates from a private CA; the server verifies clients."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("worker@sandboxer")
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    server.private_key_and_cert_chain_pem.write_to_path(str(tmp / "server.pem"))
    client.cert_chain_pems[0].write_to_path(str(tmp / "client.pem"))
    client.private_key_pem.write_to_path(str(tmp / "client.key"))
    config = (
        f'tls {{ cert_file: "{tmp / "server.pem"}", key_file: "{tmp / "server.pem"}",'
        f' ca_file: "{tmp / "ca.pem"}", verify: true }}\n'
    )
    auth = NatsAuth(tls_ca=tmp / "ca.pem", tls_cert=tmp / "client.pem", tls_key=tmp / "client.key")
    return Secured(config, auth)


def nkey(tmp: Path) -> Secured:
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    seed = tmp / "worker.nk"
    seed.write_bytes(user.seed)
    config = f"authorization {{ users: [ {{ nkey: {user.public_key.decode()} }} ] }}\n"
    return Secured(config, NatsAuth(nkey_seed_file=seed))


def user_password(tmp: Path) -> Secured:
    password = secrets.token_hex(8)
    config = f'authorization {{ user: worker, password: "{password}" }}\n'
    return Secured(config, NatsAuth(user="worker", password=password))


def token(tmp: Path) -> Secured:
    value = secrets.token_hex(8)
    return Secured(f'authorization {{ token: "{value}" }}\n', NatsAuth(token=value))


@pytest.fixture(params=[decentralized, tls, nkey, user_password, token])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Secured]]:
    method = request.param(tmp_path)
    config = tmp_path / "nats.conf"
    config.write_text(method.config)
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        yield server.url, method


async def test_a_worker_and_a_client_get_in_and_work(secured: tuple[str, Secured]) -> None:
    url, method = secured
    async with Client(url, auth=method.auth) as client:
        from sandboxer.topology import ensure_topology

        await ensure_topology(client.js)
        await Ledger(client.js).grant("acme", Decimal("10"), "funds")
        worker_settings = Settings(
            nats_url=url, nats_auth=method.auth, deployment="test", reconcile_every_s=0
        )
        worker = WorkerHandle(worker_settings)
        await worker.start()
        try:
            request = ProvisionRequest(
                request_id="r1", tenant="acme", profile="profile.burst-sandbox"
            )
            ready = await client.provision(request, wait_s=20)
            assert ready is not None and ready.state is SandboxState.READY
        finally:
            await worker.stop()
    # Without it, the server turns a client away.
    with pytest.raises(Exception):  # noqa: B017, PT011 - auth, TLS or timeout, by method
        async with Client(url):
            pass
