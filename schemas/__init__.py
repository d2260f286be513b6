"""The contract: every message sandboxer reads or writes, as pydantic v2 models.

Pure data, no I/O. `sandboxer schemas export DIR` writes their JSON Schemas (and one
meter event schema per installed extension) for publishers in other languages.
"""

from schemas._types import (
    USD_QUANTUM,
    ConsumerName,
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
    DEFAULT_OWNER,
    ConsumerManifest,
    ExtensionManifest,
    Pricing,
    Profile,
    Resources,
    SecretRef,
    TtlLimits,
    TtlOutOfRange,
    byok_path,
)
from schemas.meter import MeterEvent, MeterKind, meter_event_id, meter_event_model
from schemas.requests import DestroyRequest, ProvisionRequest
from schemas.status import (
    CredentialSource,
    ErrorCode,
    ErrorInfo,
    SandboxState,
    SandboxStatus,
)

__all__ = [
    "DEFAULT_OWNER",
    "USD_QUANTUM",
    "ConsumerManifest",
    "ConsumerName",
    "CredentialSource",
    "DestroyRequest",
    "ErrorCode",
    "ErrorInfo",
    "ExtensionId",
    "ExtensionManifest",
    "Factor",
    "LedgerEntry",
    "LedgerKind",
    "MeterEvent",
    "MeterKind",
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
    "TenantId",
    "Timestamp",
    "TtlLimits",
    "TtlOutOfRange",
    "UsageRecord",
    "Usd",
    "UsdRate",
    "byok_path",
    "meter_event_id",
    "meter_event_model",
    "quantize_usd",
    "usage_record_id",
    "utcnow",
]
