"""MeterEvent: what billing pipelines consume on `sandbox.meter.<extension_id>`.

A discriminated union on `extension_id`: the common fields say who used what for how
long; each extension adds the figures its price depends on.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas._types import ProfileId, SandboxId, Seconds, TenantId, Timestamp, Usd, UsdRate
from schemas.status import CredentialSource

MeterKind = Literal["started", "stopped"]


class _MeterEventBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event_id: str = Field(
        max_length=96,
        description="Deterministic: `<sandbox_id>.<kind>`; also the Nats-Msg-Id.",
    )
    kind: MeterKind
    sandbox_id: SandboxId
    tenant: TenantId
    profile: ProfileId
    provider_sandbox_id: str = Field(max_length=128)
    credential_source: CredentialSource = "none"
    pricing_model: Literal["metered"] = "metered"
    currency: Literal["USD"] = "USD"
    started_at: Timestamp
    stopped_at: Timestamp | None = None
    duration_s: Seconds | None = Field(default=None, description="Set on `stopped`.")
    estimate_usd: Usd = Field(description="The estimate for the whole TTL, held at start.")
    actual_usd: Usd | None = Field(default=None, description="Set on `stopped`.")


class StubMeterEvent(_MeterEventBase):
    """`ext.saas-stub`: a flat rate per running second."""

    extension_id: Literal["ext.saas-stub"] = "ext.saas-stub"
    usd_per_second: UsdRate


class E2BMeterEvent(_MeterEventBase):
    """`ext.e2b`: billed per allocated vCPU and GiB of memory per running second."""

    extension_id: Literal["ext.e2b"] = "ext.e2b"
    cpu_count: int = Field(ge=1)
    memory_mb: int = Field(ge=1)


class ModalMeterEvent(_MeterEventBase):
    """`ext.modal`: billed per CPU core, memory and GPU per running second."""

    extension_id: Literal["ext.modal"] = "ext.modal"
    cpu_cores: Seconds
    memory_mb: int = Field(ge=1)
    gpu_type: str | None = Field(default=None, max_length=32)
    gpu_count: int = Field(default=0, ge=0)


MeterEvent = Annotated[
    StubMeterEvent | E2BMeterEvent | ModalMeterEvent, Field(discriminator="extension_id")
]
meter_event_adapter: TypeAdapter[MeterEvent] = TypeAdapter(MeterEvent)


def meter_event_id(sandbox_id: str, kind: MeterKind) -> str:
    """The deterministic id of a sandbox's `started` or `stopped` event."""
    return f"{sandbox_id}.{kind}"
