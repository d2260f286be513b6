"""SandboxStatus: the state of one sandbox, stored in KV and announced on
`sandbox.status.<sandbox_id>` at every change."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import (
    ConsumerName,
    ExtensionId,
    RequestId,
    SandboxId,
    TenantId,
    Timestamp,
    Usd,
)
from schemas.reach import ControlEndpoint, Endpoint


class ErrorCode(StrEnum):
    """Stable codes of `SandboxStatus.error.code` (see SPEC)."""

    INVALID_REQUEST = "invalid_request"
    UNKNOWN_PROFILE = "unknown_profile"
    UNKNOWN_EXTENSION = "unknown_extension"
    INSUFFICIENT_CREDITS = "insufficient_credits"
    NO_ROUTE = "no_route"
    PROVIDER_REJECTED = "provider_rejected"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    QUOTA_EXCEEDED = "quota_exceeded"
    POLICY_DENIED = "policy_denied"
    TEMPLATE_FAILED = "template_failed"
    INTERNAL = "internal"


class SandboxState(StrEnum):
    """Lifecycle: provisioning -> ready -> destroying -> destroyed, or -> failed."""

    PROVISIONING = "provisioning"
    READY = "ready"
    FAILED = "failed"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"

    @property
    def settled(self) -> bool:
        """True when nothing more will happen without a new request."""
        return self in (SandboxState.READY, SandboxState.FAILED, SandboxState.DESTROYED)


CredentialSource = Literal["byok", "platform", "none"]


class ErrorInfo(BaseModel):
    """Why a request failed: a stable code and a message fit for a log (never a secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: ErrorCode
    message: str = Field(max_length=1024)


class ConnectRefusal(BaseModel):
    """The reply to a ConnectRequest that gets no credentials: `not_found` (no such
    sandbox of the asker's), `invalid_request`, `provider_unavailable`..."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    error: ErrorInfo


class TtlExtension(BaseModel):
    """One `sandbox.extend` applied to a sandbox: its request id (so a repeat applies
    nothing) and the expiry it set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId
    expires_at: Timestamp


#: The extensions a sandbox may get (each is kept in its status, for idempotency).
MAX_TTL_EXTENSIONS = 32


class SandboxStatus(BaseModel):
    """One sandbox as sandboxer knows it. Never holds a secret or a credential value."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    sandbox_id: SandboxId
    request_id: RequestId
    tenant: TenantId
    owner: ConsumerName = Field(
        default="default",
        description="The consumer the status belongs to (the tenant's, or `default`): "
        "it is stored and announced under it, `sandbox.status.<owner>.<sandbox_id>`, "
        "which only that consumer may read.",
    )
    profile: str = Field(max_length=64)
    extension_id: ExtensionId | None = None
    provider_sandbox_id: str | None = Field(default=None, max_length=128)
    state: SandboxState
    created_at: Timestamp
    ready_at: Timestamp | None = None
    expires_at: Timestamp | None = None
    destroyed_at: Timestamp | None = Field(
        default=None,
        description="When the sandbox stopped running (billing stops here); recorded once "
        "teardown is confirmed, so it may already be set while `destroying`.",
    )
    started_at: Timestamp | None = Field(
        default=None, description="When the provider started the sandbox (billing starts here)."
    )
    meter_fields: dict[str, str | int | None] | None = Field(
        default=None,
        description="What the price depends on, as the provider reported at start (E2B: "
        "cpu_count, memory_mb); copied into the sandbox's meter events.",
    )
    estimate_usd: Usd | None = None
    actual_usd: Usd | None = None
    credential_source: CredentialSource = "none"
    credential_path: str | None = Field(
        default=None, max_length=300, description="OpenBao path of the key used (no value)."
    )
    credential_version: int | None = Field(default=None, ge=1)
    template_id: str | None = Field(
        default=None,
        max_length=256,
        description="The provider's own template the sandbox is made from, when its profile "
        "or request names a logical template (`<name>@<version>`, docs/templates.md).",
    )
    error: ErrorInfo | None = None
    endpoints: list[Endpoint] | None = Field(
        default=None,
        max_length=32,
        description="Once ready: where each port of the profile is reached and how to "
        "authenticate (credentials come from `sandbox.connect`, never here).",
    )
    control: ControlEndpoint | None = Field(
        default=None, description="The provider's control API of the sandbox, if any."
    )
    ttl_extensions: tuple[TtlExtension, ...] = Field(
        default=(),  # one shared empty tuple: 10,000 statuses in flight allocate none
        max_length=MAX_TTL_EXTENSIONS,
        description="The `sandbox.extend` requests applied, oldest first.",
    )
    request_digest: str | None = Field(
        default=None,
        description="sha256 of the accepted ProvisionRequest body; a different body under "
        "the same request_id is an idempotency_conflict.",
    )

    def with_changes(self, **changes: object) -> SandboxStatus:
        """A copy with `changes` applied and validated."""
        return SandboxStatus.model_validate({**self.model_dump(), **changes})
