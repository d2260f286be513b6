"""A deployment on the trust boundary, for the tests that need one: a real nats-server
started with the configuration that `sandboxer security generate` writes, every
identity's files, and the services started each as its own identity."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as Nats

from consumers.billing import run_billing
from consumers.export import run_exporter
from consumers.templates import run_template_worker
from consumers.worker import run_worker
from sandboxer import access
from sandboxer.client import Client
from sandboxer.connect import connect_nats
from sandboxer.credits import Ledger
from sandboxer.dev.servers import EmbeddedNats
from sandboxer.settings import NatsAuth, Settings, default_extensions_dir
from tests.conftest import WorkerHandle

CONSUMERS = {"acme-app": ["acme"], "mallory-app": ["mallory"]}


@dataclass
class SecureBus:
    """A nats-server running the generated authorization, and every identity's files."""

    server: EmbeddedNats
    keys: Path
    extensions: Path

    def auth(self, identity: str) -> NatsAuth:
        return NatsAuth.from_env(access.read_env_file(self.keys / f"{identity}.env"))

    def settings(self, identity: str, **changes: Any) -> Settings:
        base = Settings(
            nats_url=self.server.url,
            deployment="test",
            extensions_dir=self.extensions,
            ack_wait_s=2.0,
            max_deliver=3,
            retry_backoff_s=0.1,
            retry_cap_s=0.5,
            reconcile_every_s=0,
            nats_auth=self.auth(identity),
        )
        return replace(base, **changes)

    def client(self, identity: str) -> Client:
        consumer = identity.removeprefix("consumer-") if identity.startswith("consumer-") else None
        return Client(self.server.url, auth=self.auth(identity), consumer=consumer)

    async def connect(self, identity: str) -> Nats:
        return await connect_nats([self.server.url], self.auth(identity), identity, quiet=True)

    def violations(self) -> list[str]:
        """What the server refused, from its log."""
        text = self.server.log_file.read_text(errors="replace")
        return [line for line in text.splitlines() if "Violation" in line]

    def env(self, identity: str) -> dict[str, str]:
        return {
            **os.environ,
            **access.read_env_file(self.keys / f"{identity}.env"),
            "SANDBOXER_NATS_URL": self.server.url,
            "SANDBOXER_EXTENSIONS_DIR": str(self.extensions),
        }


def write_deployment(root: Path) -> tuple[Path, Path, Path]:
    """Extensions with two upstream consumers; the generated keys; a server config."""
    extensions = root / "extensions"
    shutil.copytree(default_extensions_dir(), extensions)
    shutil.copytree(default_extensions_dir().parent / "templates", root / "templates")
    for name, tenants in CONSUMERS.items():
        (extensions / f"consumer.{name}.yaml").write_text(
            f"kind: consumer\nid: consumer.{name}\ntenants: {json.dumps(tenants)}\n"
        )
    keys = root / "security"
    consumers = [*CONSUMERS, "demo-app"]
    access.generate(keys, consumers)
    config = root / "nats.conf"
    config.write_text('include "security/nats-auth.conf"\n')  # relative to this file
    return extensions, keys, config


@pytest.fixture
def secure_bus(tmp_path: Path) -> Iterator[SecureBus]:
    extensions, keys, config = write_deployment(tmp_path)
    with EmbeddedNats(tmp_path / "nats", config=config) as server:
        yield SecureBus(server, keys, extensions)


@pytest.fixture
async def services(secure_bus: SecureBus) -> AsyncIterator[Callable[..., Awaitable[WorkerHandle]]]:
    """Start worker, billing, exporter or the template worker in-process, each as its
    own identity; the
    operator funds the tenants."""
    async with secure_bus.client("operator") as operator:
        from sandboxer.topology import ensure_topology

        await ensure_topology(operator.js)
        for tenant in ("acme", "mallory", "t1"):
            await Ledger(operator.js).grant(tenant, Decimal("100"), "funds")
    handles: list[WorkerHandle] = []
    runs = {
        "worker": run_worker,
        "billing": run_billing,
        "exporter": run_exporter,
        "templates": run_template_worker,
    }

    async def start(identity: str, **changes: Any) -> WorkerHandle:
        handle = WorkerHandle(secure_bus.settings(identity, **changes), runs[identity])
        await handle.start()
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        await handle.stop()
