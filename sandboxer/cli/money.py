"""Commands for money: `credits grant|balance|ledger` and `finhub export`."""

from __future__ import annotations

import asyncio
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Annotated

import typer
from pydantic import TypeAdapter, ValidationError

from sandboxer.cli._common import (
    JsonOpt,
    credits_app,
    die,
    finhub_app,
    invalid,
    nats_client,
    run,
    settings,
)
from sandboxer.credits import Balance, Ledger, checked_tenant
from sandboxer.errors import IdempotencyConflict, plain_message
from sandboxer.money import usd_text
from schemas import LedgerEntry, UsageRecord, Usd


def _tenant(raw: str) -> str:
    try:
        return checked_tenant(raw)
    except ValueError as exc:
        die(f"{exc} (letters, digits, - and _; no wildcards)")


_USD: TypeAdapter[Decimal] = TypeAdapter(Usd)


def _amount(raw: str) -> Decimal:
    """A grant's amount: a positive decimal of at most 6 decimals, below 10^15 USD."""
    try:
        amount = _USD.validate_python(raw)
    except ValidationError as exc:
        reason = plain_message(exc.errors()[0]["msg"])
        die(f"{reason} (use a decimal like 12.50)")
    if amount <= 0:
        die(f"amount must be positive: {raw}")
    return amount


@credits_app.command(
    "grant",
    # A negative amount reaches the validation instead of being taken for an option.
    context_settings={"ignore_unknown_options": True},
)
def credits_grant(
    tenant: Annotated[str, typer.Argument(help="Tenant to credit.")],
    amount: Annotated[str, typer.Argument(help="USD, e.g. 25 or 12.50.")],
    grant_id: Annotated[
        str | None, typer.Option(help="Idempotency key (default: a new one).")
    ] = None,
    note: Annotated[str, typer.Option(help="Why, for the ledger.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Add prepaid credits. The same --grant-id is applied once, however often sent;
    the same --grant-id with another amount is an `idempotency_conflict`."""
    tenant = _tenant(tenant)
    usd = _amount(amount)
    key = grant_id or uuid.uuid4().hex

    async def go() -> bool:
        async with nats_client() as client:
            return await Ledger(client.js).grant(tenant, usd, key, note)

    try:
        applied = run(go())
    except IdempotencyConflict as exc:
        die(f"{exc.code}: {exc}")
    except ValueError as exc:
        invalid("grant", exc)
    verb = "granted" if applied else "already granted"
    if as_json:
        entry = {"entry_id": f"grant-{key}", "tenant": tenant, "amount_usd": f"{usd:f}"}
        typer.echo(json.dumps({**entry, "applied": applied}))
    else:
        typer.echo(f"grant-{key}: {verb} {usd_text(usd)} USD to {tenant}")


@credits_app.command("balance")
def credits_balance(
    tenant: Annotated[str, typer.Argument(help="Tenant to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """Balance, open holds and what is available for new sandboxes."""
    tenant = _tenant(tenant)

    async def go() -> Balance:
        async with nats_client() as client:
            return await Ledger(client.js).balance(tenant)

    balance = run(go())
    figures = {
        "tenant": tenant,
        "balance_usd": f"{balance.balance:.6f}",
        "held_usd": f"{balance.held:.6f}",
        "available_usd": f"{balance.available:.6f}",
        "open_holds": len(balance.holds),
    }
    if as_json:
        typer.echo(json.dumps(figures))
    else:
        typer.echo(
            f"{tenant}  balance {figures['balance_usd']}  held {figures['held_usd']} "
            f"({len(balance.holds)} open)  available {figures['available_usd']} USD"
        )


@credits_app.command("verify")
def credits_verify(
    tenant: Annotated[str, typer.Argument(help="The tenant.")],
    as_json: JsonOpt = False,
) -> None:
    """Fold the tenant's journal from its first entry and compare it with every
    checkpoint a cold read may start from; exit 1 on any that disagrees."""
    name = _tenant(tenant)

    async def go() -> tuple[int, list[str]]:
        async with nats_client() as client:
            return await Ledger(client.js).verify(name)

    count, problems = run(go())
    if as_json:
        typer.echo(json.dumps({"tenant": name, "checkpoints": count, "problems": problems}))
    else:
        typer.echo(f"{name}: {count} checkpoints, {len(problems)} disagree")
    if problems:
        die(f"{name}: " + "; ".join(problems))


@credits_app.command("ledger")
def credits_ledger(
    tenant: Annotated[str, typer.Argument(help="Tenant to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """The tenant's journal, newest first."""
    tenant = _tenant(tenant)

    async def go() -> list[LedgerEntry]:
        async with nats_client() as client:
            return await Ledger(client.js).entries(tenant)

    for entry in reversed(run(go())):
        if as_json:
            typer.echo(entry.model_dump_json())
        else:
            sign = {"grant": "+", "debit": "-"}.get(entry.kind, " ")
            typer.echo(
                f"{entry.at.isoformat()}  {entry.kind:<7}  {sign}{entry.amount_usd:.6f}"
                f"  {entry.entry_id}  {entry.note}".rstrip()
            )


@finhub_app.command("export")
def finhub_export(
    record: Annotated[Path, typer.Option(help="A UsageRecord as JSON.")],
    url: Annotated[
        str | None, typer.Option(help="fin-hub endpoint (default: $SANDBOXER_FIN_HUB_URL).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """POST one usage record to fin-hub by hand (Idempotency-Key = record_id)."""
    from adapters.finhub import FinHubClient, Verdict

    current = settings()
    target = url or current.fin_hub_url
    if not target:
        die("no fin-hub URL: set SANDBOXER_FIN_HUB_URL or pass --url")
    try:
        usage = UsageRecord.model_validate_json(record.read_bytes())
    except OSError as exc:
        die(f"cannot read {record}: {exc.strerror}")
    except ValueError as exc:
        invalid(f"usage record in {record}", exc)

    async def go() -> str:
        client = FinHubClient(
            target, token=current.fin_hub_token, timeout_s=current.fin_hub_timeout_s
        )
        try:
            outcome = await client.post(usage)
        finally:
            await client.aclose()
        if outcome.verdict is not Verdict.DELIVERED:
            die(f"{usage.record_id} not delivered ({outcome.verdict.value}): {outcome.detail}")
        return outcome.detail

    detail = asyncio.run(go())
    if as_json:
        typer.echo(json.dumps({"record_id": usage.record_id, "delivered": True, "detail": detail}))
        return
    typer.echo(f"{usage.record_id}: delivered ({detail})")
