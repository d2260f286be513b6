"""What upstream publishes: ProvisionRequest on `sandbox.provision`, DestroyRequest on
`sandbox.destroy`, ExtendRequest on `sandbox.extend`."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas._types import ProfileId, RequestId, SandboxId, TenantId

MetadataKey = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
MetadataValue = Annotated[str, Field(max_length=256)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    request_id: RequestId = Field(description="Idempotency key, scoped to the tenant.")
    tenant: TenantId


class ProvisionRequest(_Request):
    """Ask for one sandbox. Delivering it again (or replaying it) never makes a second one."""

    profile: ProfileId
    ttl_s: int | None = Field(
        default=None,
        ge=1,
        le=7 * 24 * 3600,
        description="Lifetime in seconds; must lie within the profile's limits. "
        "Omitted: the profile's default.",
    )
    template: str | None = Field(
        default=None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./:-]*$"
    )
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=16)

    def digest(self) -> str:
        """A fingerprint of the body, to tell a redelivery from a different request that
        reuses the same `request_id` (an `idempotency_conflict`)."""
        body = self.model_dump(mode="json", exclude={"schema_version"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class DestroyRequest(_Request):
    """Ask for a sandbox to be destroyed. Destroying twice, or an unknown id, is answered
    with a status, never an error loop."""

    sandbox_id: SandboxId
    reason: str = Field(
        default="requested", min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$"
    )


class ExtendRequest(_Request):
    """Give a ready sandbox a longer life: a new TTL (counted, like a provision's, from
    its creation) or seconds added to its expiry, within the profile's limits. The
    credit hold grows first; the same `request_id` again changes nothing."""

    sandbox_id: SandboxId
    ttl_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    add_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.ttl_s is None) == (self.add_s is None):
            raise ValueError("give exactly one of ttl_s and add_s")
        return self
