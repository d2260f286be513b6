"""The contract: strict validation, exact money, JSON Schemas for other languages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas import (
    DestroyRequest,
    MeterEvent,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
    meter_event_model,
)
from schemas.export import export_json_schemas
from tests.helpers import stopped_event

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
    return stopped_event(
        0xAAAAAAAAAAAAAAAAAAAAAAAA, tenant="t1", provider_sandbox_id="stub-1", **changes
    )


class GpuFields(BaseModel):
    """What a made-up GPU cloud bills on."""

    model_config = ConfigDict(extra="forbid")

    gpu_count: int = Field(ge=1)
    gpu_type: str


def _gpu_event(**changes: object) -> dict[str, object]:
    common = {k: v for k, v in _event().items() if k != "usd_per_second"}
    return {
        **common,
        "extension_id": "ext.gpu-cloud",
        "gpu_count": 2,
        "gpu_type": "H100",
        **changes,
    }


def test_a_meter_event_validates_without_knowing_its_extension() -> None:
    event = MeterEvent.model_validate(_gpu_event())
    assert event.extension_id == "ext.gpu-cloud"
    assert event.extension_fields == {"gpu_count": 2, "gpu_type": "H100"}
    with pytest.raises(ValidationError):  # the common fields are still checked
        MeterEvent.model_validate(_gpu_event(tenant="a.b"))


@pytest.mark.parametrize(
    "extra",
    [
        {"nested": {"a": 1}},
        {"ratio": 0.5},
        {"Not-Snake": "x"},
        {"long": "x" * 257},
        {f"f{i}": i for i in range(17)},
    ],
)
def test_extension_fields_are_few_flat_and_exact(extra: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MeterEvent.model_validate({**_event(), **extra})


def test_an_extension_event_is_exactly_its_adapter_fields() -> None:
    model = meter_event_model("ext.gpu-cloud", GpuFields)
    event = model.model_validate(_gpu_event())
    assert event.extension_fields == {} and event.model_dump()["gpu_count"] == 2
    with pytest.raises(ValidationError):  # it must say what it was billed for
        model.model_validate(_gpu_event(gpu_count=None))
    with pytest.raises(ValidationError):  # and nothing another extension says
        model.model_validate(_gpu_event(usd_per_second="0.000010"))
    with pytest.raises(ValidationError):
        model.model_validate(_gpu_event(extension_id="ext.e2b"))


def test_money_is_exact_decimal_and_a_string_in_json() -> None:
    event = MeterEvent.model_validate(_event())
    assert event.actual_usd == Decimal("0.000600")
    encoded = json.loads(event.model_dump_json())
    assert encoded["actual_usd"] == "0.000600"
    assert encoded["duration_s"] == "60.000"


@pytest.mark.parametrize("amount", [0.1, "0.0000001", "NaN", "ten"])
def test_money_rejects_floats_and_inexact_amounts(amount: object) -> None:
    with pytest.raises(ValidationError):
        MeterEvent.model_validate(_event(actual_usd=amount))


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
    paths = export_json_schemas(tmp_path, {"ext.gpu-cloud": GpuFields})
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{n}.schema.json"
        for n in (
            "ProvisionRequest",
            "DestroyRequest",
            "ExtendRequest",
            "ConnectRequest",
            "ConnectGrant",
            "ConnectRefusal",
            "SandboxStatus",
            "MeterEvent",
            "UsageRecord",
            "LedgerEntry",
            "ExtensionManifest",
            "Profile",
            "ConsumerManifest",
            "MeterEvent.ext.gpu-cloud",
        )
    )
    provision = json.loads((tmp_path / "ProvisionRequest.schema.json").read_text())
    assert set(provision["required"]) == {"request_id", "tenant", "profile"}
    meter = json.loads((tmp_path / "MeterEvent.schema.json").read_text())
    assert meter["additionalProperties"] is True  # any extension's fields
    grant = json.loads((tmp_path / "ConnectGrant.schema.json").read_text())
    credential = grant["$defs"]["Credential"]["properties"]["secret"]
    assert {"type": "string", "format": "password", "writeOnly": True} in credential["anyOf"]
    gpu = json.loads((tmp_path / "MeterEvent.ext.gpu-cloud.schema.json").read_text())
    assert gpu["additionalProperties"] is False
    assert {"gpu_count", "gpu_type", "extension_id"} <= set(gpu["required"])
    assert gpu["properties"]["extension_id"]["const"] == "ext.gpu-cloud"
    status = json.loads((tmp_path / "SandboxStatus.schema.json").read_text())
    assert "actual_usd" in status["properties"]
