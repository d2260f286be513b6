"""What providers share, written once: the longest life a provider grants, retry
backoff, keeping secrets out of messages, and turning a recorded start and stop into
a priced `Usage`."""

from __future__ import annotations

import random
from collections.abc import Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from adapters.base import Credentials, ProviderSandbox, Usage
from sandboxer.money import seconds_between
from schemas import quantize_usd


class ProviderConfig(BaseModel):
    """`config` fields every cloud provider has; an adapter's `Config` extends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The provider's longest sandbox life; a longer TTL is capped to it, and nothing
    #: is billed beyond it (the provider stops the sandbox then).
    max_timeout_s: int = Field(default=3600, ge=1, le=24 * 3600)

    def timeout_s(self, ttl_s: int) -> int:
        """The timeout to create a sandbox of `ttl_s` with."""
        return min(ttl_s, self.max_timeout_s)


def backoff_s(attempt: int, *, base_s: float, cap_s: float) -> float:
    """Capped exponential backoff with full jitter for `attempt` (1-based): a random
    delay between half and all of `min(cap_s, base_s * 2 ** (attempt - 1))`."""
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def redact(text: str, credentials: Credentials) -> str:
    """`text` with every credential value blanked out, should a provider ever echo one."""
    for value in credentials.values.values():
        if value:
            text = text.replace(value, "***")
    return text


def metered_usage(
    sandbox: ProviderSandbox,
    stopped_at: datetime,
    per_second: Decimal,
    *,
    fields: Mapping[str, Any],
    max_s: int | None = None,
) -> Usage:
    """What `sandbox` cost at `per_second` USD from its start to `stopped_at` (no later
    than `max_s` after its start), rounded half-up to the micro-dollar."""
    if max_s is not None:
        stopped_at = min(stopped_at, sandbox.started_at + timedelta(seconds=max_s))
    duration = seconds_between(sandbox.started_at, stopped_at)
    return Usage(
        started_at=sandbox.started_at,
        stopped_at=stopped_at,
        duration_s=duration,
        actual_usd=quantize_usd(per_second * duration),
        meter_fields=fields,
    )
