"""Money records: ledger entries (the credits journal) and usage records (what fin-hub
receives)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import AccountName, ExtensionId, SandboxId, Seconds, TenantId, Timestamp, Usd
from schemas.status import CredentialSource

LedgerKind = Literal["grant", "hold", "release", "debit"]


class LedgerEntry(BaseModel):
    """One line of a tenant's credits journal. Its `entry_id` is deterministic and can be
    written only once, ever: `grant-<grant_id>`, `hold-<sandbox_id>`,
    `release-<sandbox_id>`, `debit-<sandbox_id>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    entry_id: str = Field(max_length=160, pattern=r"^(grant|hold|release|debit)-[A-Za-z0-9_-]+$")
    kind: LedgerKind
    tenant: TenantId | AccountName
    amount_usd: Usd = Field(ge=0, description="Grant or debit amount, or the held amount.")
    sandbox_id: SandboxId | None = None
    at: Timestamp
    note: str = Field(default="", max_length=200)


class UsageRecord(BaseModel):
    """What one destroyed sandbox cost: published on `billing.usage`, POSTed to fin-hub."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    record_id: str = Field(
        max_length=64, description="Deterministic: `usage-<sandbox_id>`; the Idempotency-Key."
    )
    sandbox_id: SandboxId
    extension_id: ExtensionId
    tenant: TenantId
    credential_source: CredentialSource = "none"
    duration_s: Seconds
    actual_usd: Usd = Field(description="What the tenant's credits were debited: 0 for BYOK.")
    provider_cost_usd: Usd = Field(
        description="The provider's price of the usage; for BYOK the tenant pays it directly."
    )
    currency: Literal["USD"] = "USD"
    started_at: Timestamp
    stopped_at: Timestamp


def usage_record_id(sandbox_id: str) -> str:
    """The deterministic id of a sandbox's usage record."""
    return f"usage-{sandbox_id}"
