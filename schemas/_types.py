"""Constrained scalar types shared by every message: ids, money, time."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, WithJsonSchema

#: Exactness of every amount: one micro-dollar.
USD_QUANTUM = Decimal("0.000001")

# Ids end up in NATS subjects and KV keys, so they may not contain dots,
# spaces or wildcards.
TenantId = Annotated[
    str,
    Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
]
RequestId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$"),
]
SandboxId = Annotated[str, Field(pattern=r"^sbx-[0-9a-f]{24}$")]
#: A journal of slots that is no tenant's: a provider account's
#: (`~<extension>-platform`, `~<extension>-byok-<tenant>`) or a consumer's as a whole
#: (`~consumer-<name>`). It starts with `~`, which no tenant name can.
AccountName = Annotated[
    str,
    Field(max_length=100, pattern=r"^~[a-z0-9][a-z0-9-]*(-byok-[A-Za-z0-9][A-Za-z0-9_-]*)?$"),
]
#: An upstream consumer's name (`extensions/consumer.<name>.yaml`), a subject token.
ConsumerName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")]
ExtensionId = Annotated[str, Field(max_length=64, pattern=r"^ext\.[a-z0-9][a-z0-9-]*$")]
ProfileId = Annotated[str, Field(max_length=64, pattern=r"^profile\.[a-z0-9][a-z0-9-]*$")]


def _reject_float(value: Any) -> Any:
    # A float has already lost exactness; accept only strings, ints and Decimals.
    if isinstance(value, float):
        raise ValueError("money must be a decimal string, not a float")
    if isinstance(value, str):
        try:
            return Decimal(value)
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {value!r}") from None
    return value


#: What every exact decimal type shares: no floats in, a decimal string out (JSON).
_NO_FLOAT = BeforeValidator(_reject_float)
_AS_TEXT = PlainSerializer(lambda v: format(v, "f"), return_type=str, when_used="json")


def _text_schema(pattern: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "pattern": pattern})


#: No amount sandboxer handles comes near it; it keeps every one exact to 0.000001.
MAX_USD = Decimal(10) ** 15


def _exact_usd(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("amount must be finite")
    if abs(value) >= MAX_USD:
        raise ValueError("amount must be below 10^15 USD")
    if value != value.quantize(USD_QUANTUM):
        raise ValueError("amount is finer than 0.000001 USD")
    return value.quantize(USD_QUANTUM)


Usd = Annotated[
    Decimal, _NO_FLOAT, AfterValidator(_exact_usd), _AS_TEXT, _text_schema(r"^-?\d+(\.\d{1,6})?$")
]
"""USD as an exact Decimal, a decimal string in JSON, at most six decimals."""

#: Finest step of a price per unit (E2B charges 0.0000045 USD per GiB-second).
RATE_QUANTUM = Decimal("1e-12")


def _exact_rate(value: Decimal) -> Decimal:
    if not value.is_finite() or value < 0:
        raise ValueError("rate must be a finite, non-negative amount")
    if value != value.quantize(RATE_QUANTUM):
        raise ValueError("rate is finer than 1e-12 USD")
    return value


UsdRate = Annotated[
    Decimal, _NO_FLOAT, AfterValidator(_exact_rate), _AS_TEXT, _text_schema(r"^\d+(\.\d{1,12})?$")
]
"""A price per unit (per second, per vCPU-second...): exact, up to twelve decimals.
Amounts computed from rates are rounded to the micro-dollar (`quantize_usd`)."""

Factor = Annotated[Decimal, _NO_FLOAT, Field(ge=0), _AS_TEXT, _text_schema(r"^\d+(\.\d+)?$")]
"""An exact multiplier of prices (a region surcharge, say): a decimal string, no float."""

Seconds = Annotated[Decimal, _NO_FLOAT, Field(ge=0), _AS_TEXT, _text_schema(r"^\d+(\.\d+)?$")]
"""A duration as an exact Decimal (decimal string in JSON): billing multiplies it."""


def quantize_usd(amount: Decimal) -> Decimal:
    """Round an amount half-up to the micro-dollar, the exactness of every stored figure."""
    return amount.quantize(USD_QUANTUM, rounding=ROUND_HALF_UP)


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a time zone")
    return value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(_aware)]


def utcnow() -> datetime:
    """The current time in UTC, the only zone sandboxer writes."""
    return datetime.now(UTC)
