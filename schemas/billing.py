"""Money records: ledger entries (the credits journal) and usage records (what fin-hub
receives)."""

from __future__ import annotations

import hashlib
import json
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


class SpendRecord(BaseModel):
    """An open hold's part of the spend windows: when its sandbox was created (epoch
    seconds), what it counts for now, and whether it was billed already."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    created: float
    counted: Usd
    billed: bool = False


class LedgerCheckpoint(BaseModel):
    """A tenant's folded journal up to entry `seq` (docs/payments.md, "Checkpoints"):
    a cold read starts here and folds only what came after. `digest` is the sha256 of
    the rest; a checkpoint whose digest does not match is not used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    tenant: TenantId | AccountName
    seq: int = Field(ge=1, description="The last journal sequence folded in.")
    at: Timestamp = Field(description="The time of the last entry folded in.")
    balance: Usd
    holds: dict[SandboxId, Usd]
    #: The entry behind each open hold, when it is not `hold-<sandbox_id>`.
    hold_ids: dict[SandboxId, str] = Field(default_factory=dict)
    spend: dict[SandboxId, SpendRecord] = Field(default_factory=dict)
    by_hour: dict[int, Usd] = Field(default_factory=dict)
    #: Creation times (epoch seconds) of the sandboxes made in the minute before `at`.
    recent_creates: list[float] = Field(default_factory=list)
    previous: int | None = Field(default=None, description="`seq` of the one before.")
    digest: str = ""

    def body_digest(self) -> str:
        """The sha256 of everything but `digest`."""
        body = self.model_dump(mode="json", exclude={"digest"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()
