"""The money rules in one place: what is held, what is debited, what BYOK changes, and
how running time becomes seconds. Each provider's price formula stays beside the
rates it reads (`adapters/<provider>.py`); every figure is a `Decimal`.

- **Held**: before a provider is called, the estimate for the sandbox's whole TTL
  (`SandboxAdapter.estimate_cost`), under the entry `hold-<sandbox_id>` for the first
  route of the profile and `hold-<sandbox_id>-r<n>` for the n-th after a fallback (a
  later route's hold replaces the earlier one).
- **Debited**: once, when the sandbox stopped: what the provider's formula makes of
  the recorded start and stop (`meter_actual`), rounded half-up to the micro-dollar.
- **BYOK**: a tenant that brings its own provider key pays the provider directly:
  nothing is held and nothing is debited; its usage records say what the provider
  charges (`provider_cost_usd`) with `actual_usd` 0.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from schemas import CredentialSource, Profile

#: Memory is priced per GiB; profiles and providers speak MiB.
MIB_PER_GIB = Decimal(1024)
#: Durations are counted to the millisecond.
SECONDS_QUANTUM = Decimal("0.001")
_MICROS_PER_SECOND = Decimal(1_000_000)


def pays_with_credits(source: CredentialSource) -> bool:
    """True when the platform's credits pay for the sandbox: holds and debits apply.
    False for BYOK, whose tenant pays its provider directly."""
    return source != "byok"


def debit_amount(source: CredentialSource, provider_cost: Decimal) -> Decimal:
    """What a stopped sandbox takes from the tenant's credits."""
    return provider_cost if pays_with_credits(source) else Decimal(0)


def route_number(profile: Profile, tenant: str, extension_id: str | None) -> int:
    """1 for a sandbox on the first route it could take, 2 after one fallback, ..."""
    routes = profile.routes_for(tenant)
    return routes.index(extension_id) + 1 if extension_id in routes else 1


def hold_entry_id(sandbox_id: str, route: int) -> str:
    """The journal entry of a sandbox's hold for its `route`-th route."""
    return f"hold-{sandbox_id}" if route == 1 else f"hold-{sandbox_id}-r{route}"


def gib(memory_mb: int) -> Decimal:
    """MiB as GiB, exactly."""
    return Decimal(memory_mb) / MIB_PER_GIB


def seconds_between(started_at: datetime, stopped_at: datetime) -> Decimal:
    """Running seconds from start to stop, to the millisecond; never negative. Exact:
    computed from the whole microseconds of the interval, never through a float."""
    delta = stopped_at - started_at
    micros = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    return max(Decimal(micros) / _MICROS_PER_SECOND, Decimal(0)).quantize(SECONDS_QUANTUM)


def usd_text(amount: Decimal) -> str:
    """An amount as people write it: `1000`, `12.5`; never `1E+3` or `1000.000000`."""
    text = f"{amount:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
