"""The contract: every message sandboxer reads or writes, as pydantic v2 models.

Pure data, no I/O. `sandboxer schemas export DIR` writes their JSON Schemas for
publishers in other languages.
"""

from schemas._types import (
    SCHEMA_VERSION,
    USD_QUANTUM,
    ExtensionId,
    Factor,
    ProfileId,
    RequestId,
    SandboxId,
    Seconds,
    TenantId,
    Timestamp,
    Usd,
    UsdRate,
    quantize_usd,
    utcnow,
)
from schemas.billing import LedgerEntry, LedgerKind, UsageRecord, usage_record_id
from schemas.manifest import (
    ExtensionManifest,
    Pricing,
    Profile,
    Resources,
    SecretRef,
    TtlLimits,
    TtlOutOfRange,
)
from schemas.meter import (
    E2BMeterEvent,
    MeterEvent,
    MeterKind,
    ModalMeterEvent,
    StubMeterEvent,
    meter_event_adapter,
    meter_event_id,
)
from schemas.requests import DestroyRequest, ProvisionRequest
from schemas.status import (
    CredentialSource,
    ErrorCode,
    ErrorInfo,
    SandboxState,
    SandboxStatus,
)

__all__ = [
    "SCHEMA_VERSION",
    "USD_QUANTUM",
    "CredentialSource",
    "DestroyRequest",
    "E2BMeterEvent",
    "ErrorCode",
    "ErrorInfo",
    "ExtensionId",
    "ExtensionManifest",
    "Factor",
    "LedgerEntry",
    "LedgerKind",
    "MeterEvent",
    "MeterKind",
    "ModalMeterEvent",
    "Pricing",
    "Profile",
    "ProfileId",
    "ProvisionRequest",
    "RequestId",
    "Resources",
    "SandboxId",
    "SandboxState",
    "SandboxStatus",
    "Seconds",
    "SecretRef",
    "StubMeterEvent",
    "TenantId",
    "Timestamp",
    "TtlLimits",
    "TtlOutOfRange",
    "UsageRecord",
    "Usd",
    "UsdRate",
    "meter_event_adapter",
    "meter_event_id",
    "quantize_usd",
    "usage_record_id",
    "utcnow",
]
