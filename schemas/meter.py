"""MeterEvent: what billing pipelines consume on `sandbox.meter.<extension_id>`.

The common fields say who used what for how long; each extension adds, at the top level
of the same object, the figures its price depends on (E2B: `cpu_count`, `memory_mb`).
`MeterEvent` validates the common part of any extension's event, so a consumer needs
to know no extension to read one; `meter_event_model(extension_id, fields)` is the
exact event of one extension, common fields plus its own and nothing else.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from schemas._types import (
    ExtensionId,
    ProfileId,
    SandboxId,
    Seconds,
    TenantId,
    Timestamp,
    Usd,
)
from schemas.status import CredentialSource

MeterKind = Literal["started", "stopped"]

#: Bounds of what an extension may add to an event: a few flat, named figures.
MAX_EXTENSION_FIELDS = 16
_FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_TEXT = 256


class MeterEvent(BaseModel):
    """One `started` or `stopped` event. Fields besides the common ones belong to the
    extension (`extension_fields`); they are flat values: text, whole numbers, exact
    decimals or null."""

    model_config = ConfigDict(extra="allow", frozen=True)

    schema_version: Literal[1] = 1
    event_id: str = Field(
        max_length=96,
        description="Deterministic: `<sandbox_id>.<kind>`; also the Nats-Msg-Id.",
    )
    kind: MeterKind
    extension_id: ExtensionId
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

    @model_validator(mode="after")
    def _flat_extension_fields(self) -> Self:
        extra = self.__pydantic_extra__ or {}
        if len(extra) > MAX_EXTENSION_FIELDS:
            raise ValueError(f"at most {MAX_EXTENSION_FIELDS} extension fields")
        for name, value in extra.items():
            if _FIELD_NAME.fullmatch(name) is None:
                raise ValueError(f"extension field {name[:64]!r} is not a lower_snake name")
            if isinstance(value, float) or not isinstance(value, str | int | Decimal | None):
                raise ValueError(f"extension field {name}: text, a whole number or null only")
            if isinstance(value, str) and len(value) > _MAX_TEXT:
                raise ValueError(f"extension field {name}: longer than {_MAX_TEXT} characters")
        return self

    @property
    def extension_fields(self) -> dict[str, object]:
        """What the extension added: the figures its price depends on."""
        return dict(self.__pydantic_extra__ or {})


class _ExactMeterEvent(MeterEvent):
    model_config = ConfigDict(extra="forbid", frozen=True)


def meter_event_model(extension_id: str, fields: type[BaseModel]) -> type[MeterEvent]:
    """The meter event of one extension: the common fields, `extension_id` fixed, and
    `fields` (the adapter's `MeterFields`) at the top level; nothing else."""
    name = "".join(part.capitalize() for part in re.split(r"[.-]", extension_id))
    definitions: dict[str, Any] = {
        key: (info.annotation, info) for key, info in fields.model_fields.items()
    }
    definitions["extension_id"] = (Literal.__getitem__(extension_id), ...)
    model: type[MeterEvent] = create_model(
        f"{name}MeterEvent",
        __base__=_ExactMeterEvent,
        __doc__=f"`{extension_id}`: {(fields.__doc__ or '').strip()}",
        **definitions,
    )
    return model


def meter_event_id(sandbox_id: str, kind: MeterKind) -> str:
    """The deterministic id of a sandbox's `started` or `stopped` event."""
    return f"{sandbox_id}.{kind}"
