"""The contract: strict validation, exact money, JSON Schemas for other languages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import (
    DestroyRequest,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
    StubMeterEvent,
    meter_event_adapter,
)
from schemas.export import export_json_schemas

MINIMAL = {"request_id": "r1", "tenant": "t1", "profile": "profile.burst-sandbox"}


def test_minimal_provision_request_defaults_schema_version() -> None:
    request = ProvisionRequest.model_validate_json(json.dumps(MINIMAL))
    assert request.schema_version == 1
    assert request.ttl_s is None and request.metadata == {}


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": ""},
        {"tenant": "a.b"},  # a dot would split a NATS subject
        {"tenant": "a*"},
        {"tenant": "x" * 65},
        {"request_id": "with space"},
        {"request_id": "r" * 129},
        {"profile": "burst"},
        {"ttl_s": 0},
        {"ttl_s": -5},
        {"metadata": {"k": "v" * 257}},
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        {"metadata": {"bad key": "v"}},
        {"schema_version": 2},
        {"unexpected": True},
    ],
)
def test_provision_request_rejects(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ProvisionRequest.model_validate({**MINIMAL, **change})


def test_digest_tells_bodies_apart_but_not_redeliveries() -> None:
    a = ProvisionRequest.model_validate(MINIMAL)
    b = ProvisionRequest.model_validate_json(json.dumps(MINIMAL, indent=4))
    c = ProvisionRequest.model_validate({**MINIMAL, "ttl_s": 60})
    assert a.digest() == b.digest() != c.digest()


def test_destroy_request_needs_a_well_formed_sandbox_id() -> None:
    with pytest.raises(ValidationError):
        DestroyRequest(request_id="d", tenant="t", sandbox_id="sbx-../../x")
    ok = DestroyRequest(request_id="d", tenant="t", sandbox_id="sbx-" + "a" * 24)
    assert ok.reason == "requested"


def _event(**changes: object) -> dict[str, object]:
    return {
        "event_id": "sbx-aaaaaaaaaaaaaaaaaaaaaaaa.stopped",
        "kind": "stopped",
        "extension_id": "ext.saas-stub",
        "sandbox_id": "sbx-" + "a" * 24,
        "tenant": "t1",
        "profile": "profile.burst-sandbox",
        "provider_sandbox_id": "stub-1",
        "started_at": "2026-01-01T00:00:00Z",
        "stopped_at": "2026-01-01T00:01:00Z",
        "duration_s": "60.000",
        "estimate_usd": "0.009000",
        "actual_usd": "0.000600",
        "usd_per_second": "0.000010",
        **changes,
    }


def test_meter_event_is_discriminated_by_extension_id() -> None:
    event = meter_event_adapter.validate_python(_event())
    assert isinstance(event, StubMeterEvent)
    e2b_fields = {k: v for k, v in _event().items() if k != "usd_per_second"}
    e2b = meter_event_adapter.validate_python(
        {**e2b_fields, "extension_id": "ext.e2b", "cpu_count": 2, "memory_mb": 512}
    )
    assert e2b.extension_id == "ext.e2b"
    with pytest.raises(ValidationError):  # an E2B event must say what it was billed for
        meter_event_adapter.validate_python({**e2b_fields, "extension_id": "ext.e2b"})
    with pytest.raises(ValidationError):
        meter_event_adapter.validate_python(_event(extension_id="ext.unknown"))


def test_money_is_exact_decimal_and_a_string_in_json() -> None:
    event = meter_event_adapter.validate_python(_event())
    assert event.actual_usd == Decimal("0.000600")
    encoded = json.loads(meter_event_adapter.dump_json(event))
    assert encoded["actual_usd"] == "0.000600"
    assert encoded["duration_s"] == "60.000"


@pytest.mark.parametrize("amount", [0.1, "0.0000001", "NaN", "ten"])
def test_money_rejects_floats_and_inexact_amounts(amount: object) -> None:
    with pytest.raises(ValidationError):
        meter_event_adapter.validate_python(_event(actual_usd=amount))


def test_status_never_accepts_naive_timestamps() -> None:
    with pytest.raises(ValidationError):
        SandboxStatus(
            sandbox_id="sbx-" + "a" * 24,
            request_id="r",
            tenant="t",
            profile="p",
            state=SandboxState.READY,
            created_at=datetime(2026, 1, 1),
        )
    ok = SandboxStatus(
        sandbox_id="sbx-" + "a" * 24,
        request_id="r",
        tenant="t",
        profile="p",
        state=SandboxState.READY,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert ok.credential_source == "none"


def test_exported_json_schemas_describe_every_contract(tmp_path: Path) -> None:
    paths = export_json_schemas(tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{n}.schema.json"
        for n in (
            "ProvisionRequest",
            "DestroyRequest",
            "SandboxStatus",
            "MeterEvent",
            "UsageRecord",
            "LedgerEntry",
            "ExtensionManifest",
            "Profile",
        )
    )
    provision = json.loads((tmp_path / "ProvisionRequest.schema.json").read_text())
    assert set(provision["required"]) == {"request_id", "tenant", "profile"}
    meter = json.loads((tmp_path / "MeterEvent.schema.json").read_text())
    assert meter["discriminator"]["propertyName"] == "extension_id"
    status = json.loads((tmp_path / "SandboxStatus.schema.json").read_text())
    assert "actual_usd" in status["properties"]
