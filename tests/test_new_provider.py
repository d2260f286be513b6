"""The adapter seam is closed: a provider that is nowhere in this tree (one adapter
module and one manifest in a folder of their own, plus a profile) runs end to end
through `sandboxer worker` and `sandboxer billing` over real NATS, with meter fields of
its own that no schema of the tree knows."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from schemas import DestroyRequest, ProvisionRequest, SandboxState, quantize_usd
from tests.helpers import meter_events, stream_messages

ADAPTER = '''
"""`ext.acme-cloud`: a made-up provider billed per accelerator-second."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from adapters.base import (
    AdapterContext,
    Credentials,
    ProviderSandbox,
    SandboxAdapter,
    SandboxSpec,
    Usage,
)
from adapters.shared import metered_usage
from schemas import Profile, UsdRate, quantize_usd, utcnow


class AcmeRates(BaseModel):
    model_config = ConfigDict(extra="forbid")

    usd_per_accelerator_second: UsdRate


class AcmeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    accelerators: int = Field(default=1, ge=1)
    zone: str = "eu-1"


class AcmeMeterFields(BaseModel):
    """Billed per accelerator-second, in a zone."""

    model_config = ConfigDict(extra="forbid")

    accelerators: int = Field(ge=1)
    zone: str


class AcmeCloudAdapter(SandboxAdapter):
    extension_id: ClassVar[str] = "ext.acme-cloud"
    Rates: ClassVar[type[BaseModel]] = AcmeRates
    Config: ClassVar[type[BaseModel]] = AcmeConfig
    MeterFields: ClassVar[type[BaseModel]] = AcmeMeterFields
    env_prefix: ClassVar[str | None] = "SANDBOXER_ACME_"

    def __init__(self, context: AdapterContext) -> None:
        self.rates = context.rates(AcmeRates)
        self.config = context.config(AcmeConfig, self.env_prefix)
        self._made: dict[str, ProviderSandbox] = {}

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        made = "acme-" + hashlib.sha256(spec.sandbox_id.encode()).hexdigest()[:12]
        if made not in self._made:
            fields = {"accelerators": self.config.accelerators, "zone": self.config.zone}
            self._made[made] = ProviderSandbox(made, spec.tags, True, utcnow(), fields)
        return self._made[made]

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        return sandbox

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        self._made.pop(provider_sandbox_id, None)

    def estimate_cost(self, profile: Profile, ttl_s: int) -> Decimal:
        per_second = self.config.accelerators * self.rates.usd_per_accelerator_second
        return quantize_usd(per_second * ttl_s)

    def meter_actual(self, sandbox: ProviderSandbox, stopped_at: datetime) -> Usage:
        fields = AcmeMeterFields.model_validate(sandbox.meter_fields)
        per_second = fields.accelerators * self.rates.usd_per_accelerator_second
        return metered_usage(sandbox, stopped_at, per_second, fields=fields.model_dump())

    async def find(
        self, tags: Mapping[str, str], credentials: Credentials
    ) -> list[ProviderSandbox]:
        return [s for s in self._made.values() if tags.items() <= s.tags.items()]
'''

MANIFEST = """
kind: extension
id: ext.acme-cloud
name: Acme Cloud
adapter: acme_cloud:AcmeCloudAdapter
pricing:
  pricing_model: metered
  rates:
    usd_per_accelerator_second: "0.000250"
config:
  accelerators: 1
"""

PROFILE = """
kind: profile
id: profile.acme-gpu
pricing_model: metered
routes: [ext.acme-cloud]
ttl: {default_s: 600, max_s: 3600}
"""


def write_provider(root: Path) -> dict[str, str]:
    """The new provider in a folder outside the tree; the environment that points the
    service at it."""
    (root / "plugins").mkdir()
    (root / "plugins" / "acme_cloud.py").write_text(ADAPTER)
    (root / "extensions").mkdir()
    (root / "extensions" / "ext.acme-cloud.yaml").write_text(textwrap.dedent(MANIFEST))
    (root / "extensions" / "profile.acme-gpu.yaml").write_text(textwrap.dedent(PROFILE))
    return {
        "SANDBOXER_EXTENSIONS_DIR": str(root / "extensions"),
        "PYTHONPATH": str(root / "plugins"),
        "SANDBOXER_ACME_ACCELERATORS": "2",  # its config, overridden as any adapter's
    }


async def until(check: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_a_provider_from_outside_the_tree_provisions_meters_and_bills(
    tmp_path: Path,
    settings: Settings,
    js: JetStreamContext,
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
    spawn_billing: Callable[..., subprocess.Popen[bytes]],
) -> None:
    env = write_provider(tmp_path)
    spawn_worker(**env)
    spawn_billing(**env)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    await Ledger(js).grant(tenant, Decimal("5"), "funds")

    async with Client(settings.nats_url) as client:
        request = ProvisionRequest(
            request_id="r1", tenant=tenant, profile="profile.acme-gpu", ttl_s=600
        )
        ready = await client.provision(request, wait_s=30)
        assert ready is not None and ready.state is SandboxState.READY, ready
        assert ready.extension_id == "ext.acme-cloud"
        assert ready.estimate_usd == Decimal("0.300000")  # 2 x 0.000250 x 600 s
        destroy = DestroyRequest(request_id="d1", tenant=tenant, sandbox_id=ready.sandbox_id)
        done = await client.destroy(destroy, wait_s=30)
        assert done is not None and done.state is SandboxState.DESTROYED, done

    events = {e["kind"]: e for e in await meter_events(js, ready.sandbox_id)}
    assert set(events) == {"started", "stopped"}
    for event in events.values():  # its own fields, at the top level, as any provider's
        assert event["extension_id"] == "ext.acme-cloud"
        assert (event["accelerators"], event["zone"]) == (2, "eu-1")
    stopped = events["stopped"]
    actual = Decimal(stopped["actual_usd"])
    assert actual == quantize_usd(Decimal(stopped["duration_s"]) * 2 * Decimal("0.000250"))
    assert done.actual_usd == actual

    async def billed() -> bool:
        return any(e.kind == "debit" for e in await Ledger(js).entries(tenant))

    await until(billed)
    debits = [e for e in await Ledger(js).entries(tenant) if e.kind == "debit"]
    assert [e.amount_usd for e in debits] == [actual]
    records = [b for _, b in await stream_messages(js, "BILLING")]
    assert [(r["extension_id"], Decimal(r["actual_usd"])) for r in records] == [
        ("ext.acme-cloud", actual)
    ]
    balance = await Ledger(js).balance(tenant)
    assert balance.balance == Decimal("5") - actual and balance.holds == {}


def test_its_meter_event_schema_is_exported(tmp_path: Path) -> None:
    env = write_provider(tmp_path)
    out = tmp_path / "schemas"
    result = subprocess.run(
        [sys.executable, "-m", "sandboxer", "schemas", "export", str(out)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    schema = (out / "MeterEvent.ext.acme-cloud.schema.json").read_text()
    assert '"accelerators"' in schema and '"zone"' in schema
