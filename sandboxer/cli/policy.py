"""Commands for consumer policy: `usage TENANT` and `policy show|set TENANT`
(docs/policy.md)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated, Any

import typer
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from sandboxer.cli._common import JsonOpt, app, die, load_registry, nats_client, policy_app, run
from sandboxer.cli.money import _amount, _tenant
from sandboxer.credits import Ledger
from sandboxer.topology import POLICY_BUCKET
from schemas import LimitsOverride, TenantLimits, utcnow

_LIMITS = ("max_concurrent", "creates_per_minute", "hourly_usd", "daily_usd")


def _key(tenant: str) -> str:
    return f"tenant.{tenant}"


async def _override(kv: KeyValue, tenant: str) -> LimitsOverride | None:
    try:
        entry = await kv.get(_key(tenant))
    except (KeyNotFoundError, NotFoundError):
        return None
    return LimitsOverride.model_validate_json(entry.value or b"") if entry.value else None


def _effective(tenant: str, override: LimitsOverride | None) -> tuple[TenantLimits, str]:
    """The tenant's limits and where they come from."""
    if override is not None:
        return (
            override.limits,
            f"override by {override.set_by} at {override.set_at:%Y-%m-%dT%H:%M:%SZ}",
        )
    consumer = load_registry().consumer_of(tenant)
    if consumer is None:
        return TenantLimits(), "no consumer profile lists it: no limits"
    return consumer.tenant_limits, f"{consumer.id}"


def _text(value: object) -> str:
    return "-" if value is None else str(value)


@app.command()
def usage(
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    as_json: JsonOpt = False,
) -> None:
    """What a tenant uses now against its limits: sandboxes running, created in the
    last minute, spent (or held) this UTC hour and today."""
    name = _tenant(tenant)

    async def go() -> dict[str, Any]:
        async with nats_client() as client:
            balance = await Ledger(client.js).balance(name)
            override = await _override(await client.js.key_value(POLICY_BUCKET), name)
        now = utcnow()
        limits, source = _effective(name, override)
        used = {
            "max_concurrent": len(balance.holds),
            "creates_per_minute": balance.creates_last_minute(now),
            "hourly_usd": balance.hour_spend(now),
            "daily_usd": balance.day_spend(now),
        }
        return {"tenant": name, "limits_from": source, "used": used, "limits": limits}

    found = run(go())
    limits: TenantLimits = found["limits"]
    if as_json:
        body = {
            **found,
            "used": {k: str(v) for k, v in found["used"].items()},
            "limits": json.loads(limits.model_dump_json()),
        }
        typer.echo(json.dumps(body))
        return
    typer.echo(f"{name}  limits from {found['limits_from']}")
    for limit in _LIMITS:
        used = found["used"][limit]
        shown = f"{used:.6f}" if isinstance(used, Decimal) else str(used)
        typer.echo(f"  {limit:<20} {shown:>14}  of {_text(getattr(limits, limit))}")


@policy_app.command("show")
def policy_show(
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    as_json: JsonOpt = False,
) -> None:
    """A tenant's limits, where they come from, and the overrides' history."""
    name = _tenant(tenant)

    async def go() -> tuple[LimitsOverride | None, list[dict[str, Any]]]:
        async with nats_client() as client:
            kv = await client.js.key_value(POLICY_BUCKET)
            try:
                history = await kv.history(_key(name))
            except (KeyNotFoundError, NotFoundError):
                history = []
            override = await _override(kv, name)
        past = []
        for entry in history:
            if entry.value:
                past.append(
                    json.loads(LimitsOverride.model_validate_json(entry.value).model_dump_json())
                )
            else:
                past.append({"tenant": name, "cleared": True, "revision": entry.revision})
        return override, past

    override, past = run(go())
    limits, source = _effective(name, override)
    if as_json:
        body = {
            "tenant": name,
            "limits_from": source,
            "limits": json.loads(limits.model_dump_json()),
            "history": past,
        }
        typer.echo(json.dumps(body))
        return
    typer.echo(f"{name}  limits from {source}")
    for limit in _LIMITS:
        typer.echo(f"  {limit:<20} {_text(getattr(limits, limit))}")
    for item in past:
        if item.get("cleared"):
            typer.echo("  history: override cleared")
        else:
            typer.echo(
                f"  history: {item['set_at']} by {item['set_by']}: "
                + ", ".join(f"{k}={_text(v)}" for k, v in item["limits"].items())
                + (f" ({item['reason']})" if item["reason"] else "")
            )


@policy_app.command("set")
def policy_set(
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    max_concurrent: Annotated[int | None, typer.Option(min=0, help="Sandboxes at once.")] = None,
    creates_per_minute: Annotated[
        int | None, typer.Option(min=0, help="New sandboxes in any 60 s.")
    ] = None,
    hourly_usd: Annotated[str | None, typer.Option(help="Spend cap per UTC hour.")] = None,
    daily_usd: Annotated[str | None, typer.Option(help="Spend cap per UTC day.")] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Drop the override: the consumer profile's again.")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "",
    by: Annotated[str, typer.Option(help="Who sets it, for the record.")] = "operator",
    as_json: JsonOpt = False,
) -> None:
    """Override a tenant's limits at run time (workers apply it within seconds); the
    limits not given are none. Every change is kept in the bucket's history."""
    name = _tenant(tenant)
    given = [max_concurrent, creates_per_minute, hourly_usd, daily_usd]
    if clear == any(v is not None for v in given):
        die("give limits to set, or --clear (not both)")
    override = None
    if not clear:
        limits = TenantLimits(
            max_concurrent=max_concurrent,
            creates_per_minute=creates_per_minute,
            hourly_usd=_amount(hourly_usd) if hourly_usd is not None else None,
            daily_usd=_amount(daily_usd) if daily_usd is not None else None,
        )
        override = LimitsOverride(
            tenant=name, limits=limits, set_by=by, set_at=utcnow(), reason=reason
        )

    async def go() -> None:
        async with nats_client() as client:
            kv = await client.js.key_value(POLICY_BUCKET)
            if override is None:
                await kv.delete(_key(name))
            else:
                await kv.put(_key(name), override.model_dump_json().encode())

    run(go())
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tenant": name,
                    "override": json.loads(override.model_dump_json()) if override else None,
                }
            )
        )
    elif override is None:
        typer.echo(f"{name}: override cleared; its consumer profile's limits apply")
    else:
        typer.echo(
            f"{name}: " + ", ".join(f"{k}={_text(getattr(override.limits, k))}" for k in _LIMITS)
        )
