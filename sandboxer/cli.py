"""`sandboxer`: run the service, and talk to it.

Exit codes: 0 success; 1 the operation failed (one line on stderr says why);
2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import uuid
from collections.abc import Coroutine
from contextlib import ExitStack
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import uvloop
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from sandboxer.client import Client
from sandboxer.credits import Balance, Ledger
from sandboxer.embedded import EmbeddedNats
from sandboxer.errors import ManifestError, SandboxerError
from sandboxer.registry import Registry
from sandboxer.settings import Settings
from sandboxer.topology import ensure_topology
from schemas import (
    USD_QUANTUM,
    DestroyRequest,
    LedgerEntry,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
    UsageRecord,
)

app = typer.Typer(
    name="sandboxer",
    help="Event-driven sandbox broker on NATS JetStream.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
schemas_app = typer.Typer(help="The message contract.", no_args_is_help=True)
app.add_typer(schemas_app, name="schemas")
credits_app = typer.Typer(help="Prepaid credits of tenants.", no_args_is_help=True)
app.add_typer(credits_app, name="credits")
finhub_app = typer.Typer(help="The fin-hub export.", no_args_is_help=True)
app.add_typer(finhub_app, name="finhub")
route_app = typer.Typer(help="How requests are routed.", no_args_is_help=True)
app.add_typer(route_app, name="route")
dlq_app = typer.Typer(
    help="Dead letters: messages a consumer gave up on (sandbox.dlq.<consumer>).",
    no_args_is_help=True,
)
app.add_typer(dlq_app, name="dlq")

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def _die(reason: str) -> NoReturn:
    typer.echo(f"sandboxer: {reason}", err=True)
    raise typer.Exit(1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine, turning connection trouble into one clear line."""
    settings = Settings.from_env()
    try:
        return asyncio.run(coro)
    except (NoServersError, OSError) as exc:
        _die(f"cannot reach NATS at {settings.nats_url} ({exc}); is `sandboxer dev` running?")
    except (NoStreamResponseError, ServiceUnavailableError):
        _die(f"no sandboxer streams on {settings.nats_url}; start a worker first")
    except (TimeoutError, NatsTimeout):
        _die("timed out waiting for an answer")
    except ManifestError as exc:
        _die(str(exc))


def _run_service(coro: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop: it halves the event loop's share of the CPU
    that every message costs (see docs/architecture.md, "Throughput")."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _print_status(status: SandboxStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(status.model_dump_json())
        return
    line = f"{status.sandbox_id}  {status.state}"
    if status.extension_id:
        line += f"  {status.extension_id}"
    if status.provider_sandbox_id:
        line += f"  provider_id={status.provider_sandbox_id}"
    if status.expires_at and status.state is SandboxState.READY:
        line += f"  expires_at={status.expires_at.isoformat()}"
    if status.actual_usd is not None:
        line += f"  actual_usd={status.actual_usd}"
    elif status.estimate_usd is not None:
        line += f"  estimate_usd={status.estimate_usd}"
    if status.error:
        line += f"  error={status.error.code}: {status.error.message}"
    typer.echo(line)


def _exit_for(status: SandboxStatus | None, as_json: bool) -> None:
    if status is None:
        return
    _print_status(status, as_json)
    if status.state is SandboxState.FAILED:
        raise typer.Exit(1)


# -- running the service --------------------------------------------------------------


@app.command()
def worker(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run a provisioner worker against $SANDBOXER_NATS_URL until SIGTERM."""
    from consumers.worker import run_worker

    _setup_logging(log_level)
    settings = Settings.from_env()
    try:
        _run_service(run_worker(settings))
    except ManifestError as exc:
        _die(str(exc))
    except (NoServersError, OSError) as exc:
        _die(f"cannot reach NATS at {settings.nats_url}: {exc}")


@app.command()
def billing(
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the billing consumer (debits, usage records) and, if $SANDBOXER_FIN_HUB_URL is
    set, the fin-hub exporter, until SIGTERM."""
    from consumers.billing import run_billing

    _setup_logging(log_level)
    settings = Settings.from_env()
    try:
        _run_service(run_billing(settings))
    except (NoServersError, OSError) as exc:
        _die(f"cannot reach NATS at {settings.nats_url}: {exc}")


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Port of the embedded NATS server.")] = 4222,
    state_dir: Annotated[Path, typer.Option(help="Where NATS keeps its data.")] = Path(
        ".sandboxer"
    ),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    fake_e2b: Annotated[
        bool,
        typer.Option(
            "--fake-e2b",
            help="Also start a fake E2B API and a dev OpenBao holding its platform key, "
            "so that profile.e2b-burst works offline.",
        ),
    ] = False,
    fake_modal: Annotated[
        bool,
        typer.Option(
            "--fake-modal",
            help="Also start a fake Modal API (gRPC) and a dev OpenBao holding its platform "
            "token, so that profile.modal-gpu works offline.",
        ),
    ] = False,
) -> None:
    """Start an embedded nats-server with JetStream and a worker, for local use."""
    from dataclasses import replace

    _setup_logging(log_level)
    stack = ExitStack()
    server = EmbeddedNats(state_dir / "nats", port=port)
    try:
        stack.enter_context(server)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        _die(f"cannot start nats-server: {exc} (try --port)")
    settings = replace(Settings.from_env(), nats_url=server.url)
    env = "" if port == 4222 else f"SANDBOXER_NATS_URL={server.url} "
    profile = "profile.modal-gpu" if fake_modal else "profile.burst-sandbox"
    profile = "profile.e2b-burst" if fake_e2b else profile
    if fake_e2b or fake_modal:
        from sandboxer.devfakes import start_fake_providers

        try:
            for line in start_fake_providers(
                stack, settings, state_dir, e2b=fake_e2b, modal=fake_modal
            ):
                typer.echo(f"sandboxer dev: {line}", err=True)
        except (RuntimeError, TimeoutError, FileNotFoundError, ImportError) as exc:
            stack.close()
            _die(f"cannot start the fake providers: {exc}")
    typer.echo(
        f"sandboxer dev: NATS with JetStream on {server.url}, state in {state_dir}/\n"
        f"In another shell:\n"
        f"  {env}.venv/bin/sandboxer provision --tenant demo --profile {profile} --wait\n"
        f"  {env}.venv/bin/sandboxer destroy <sandbox_id> --wait\n"
        f"  {env}.venv/bin/sandboxer ls\n"
        f"  {env}.venv/bin/sandboxer credits balance demo\n"
        f"  {env}.venv/bin/sandboxer credits ledger demo\n"
        f"Ctrl-C stops the worker and the server.",
        err=True,
    )
    try:
        _run_service(_dev_services(settings))
    except ManifestError as exc:
        _die(str(exc))
    finally:
        stack.close()


#: What `sandboxer dev` grants the `demo` tenant, once per state folder.
DEMO_CREDITS = Decimal("10")


async def _dev_services(settings: Settings) -> None:
    """Worker and billing in one process, and credits for the demo tenant."""
    from consumers.billing import run_billing
    from consumers.worker import run_worker

    async with Client(settings.nats_url) as client:
        await ensure_topology(client.js, replicas=settings.replicas)
        if await Ledger(client.js).grant("demo", DEMO_CREDITS, "dev-welcome", "sandboxer dev"):
            logging.getLogger("sandboxer.dev").info("granted %s USD to tenant demo", DEMO_CREDITS)
    stop = asyncio.Event()
    await asyncio.gather(run_worker(settings, stop), run_billing(settings, stop))


# -- talking to it --------------------------------------------------------------------


@app.command()
def provision(
    tenant: Annotated[str, typer.Option(help="Tenant to provision for.")],
    profile: Annotated[str, typer.Option(help="Profile id, e.g. profile.burst-sandbox.")],
    ttl: Annotated[int | None, typer.Option(help="Lifetime in seconds.")] = None,
    template: Annotated[str | None, typer.Option(help="Provider template.")] = None,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key (default: a new one).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Wait for ready or failed.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a sandbox; with --wait, print its status once ready (or failed)."""
    try:
        request = ProvisionRequest(
            request_id=request_id or uuid.uuid4().hex,
            tenant=tenant,
            profile=profile,
            ttl_s=ttl,
            template=template,
        )
    except ValueError as exc:
        _die(f"invalid request: {exc}".replace("\n", " "))

    async def go() -> SandboxStatus | None:
        async with Client(Settings.from_env().nats_url) as client:
            return await client.provision(request, wait_s=timeout if wait else None)

    status = _run(go())
    if status is None:
        from sandboxer.ids import sandbox_id_for

        sandbox_id = sandbox_id_for(request.tenant, request.request_id)
        typer.echo(json.dumps({"sandbox_id": sandbox_id}) if as_json else sandbox_id)
    _exit_for(status, as_json)


@app.command()
def destroy(
    sandbox_id: Annotated[str, typer.Argument(help="The sandbox to destroy.")],
    tenant: Annotated[
        str | None, typer.Option(help="Owner (default: read from its status).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why, for the record.")] = "requested",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until destroyed.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Destroy a sandbox (idempotent) and print its final status."""

    async def go() -> SandboxStatus | None:
        async with Client(Settings.from_env().nats_url) as client:
            owner = tenant
            if owner is None:
                current = await client.status(sandbox_id)
                if current is None:
                    _die(f"not_found: no sandbox {sandbox_id}")
                owner = current.tenant
            request = DestroyRequest(
                request_id=f"cli-{uuid.uuid4().hex}",
                tenant=owner,
                sandbox_id=sandbox_id,
                reason=reason,
            )
            return await client.destroy(request, wait_s=timeout if wait else None)

    try:
        _exit_for(_run(go()), as_json)
    except ValueError as exc:
        _die(f"invalid request: {exc}".replace("\n", " "))


@app.command()
def status(
    sandbox_id: Annotated[str, typer.Argument(help="The sandbox to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """Print the stored status of a sandbox."""

    async def go() -> SandboxStatus | None:
        async with Client(Settings.from_env().nats_url) as client:
            return await client.status(sandbox_id)

    found = _run(go())
    if found is None:
        _die(f"not_found: no sandbox {sandbox_id}")
    _print_status(found, as_json)


@app.command("ls")
def list_sandboxes(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    state: Annotated[SandboxState | None, typer.Option(help="Only in this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List sandboxes, newest first."""

    async def go() -> list[SandboxStatus]:
        async with Client(Settings.from_env().nats_url) as client:
            return await client.statuses()

    rows = [
        s
        for s in _run(go())
        if (tenant is None or s.tenant == tenant) and (state is None or s.state is state)
    ]
    rows.sort(key=lambda s: s.created_at, reverse=True)
    for row in rows:
        _print_status(row, as_json)


def _registry() -> Registry:
    try:
        return Registry.load(Settings.from_env().extensions_dir)
    except ManifestError as exc:
        _die(str(exc))


@app.command()
def extensions(as_json: JsonOpt = False) -> None:
    """List installed extensions and their pricing."""
    for manifest in _registry().extensions.values():
        if as_json:
            typer.echo(manifest.model_dump_json())
        else:
            rates = ", ".join(f"{k}={v}" for k, v in manifest.pricing.rates.items())
            typer.echo(
                f"{manifest.id}  {manifest.adapter}  {manifest.pricing.pricing_model}  {rates}"
            )


@app.command()
def profiles(as_json: JsonOpt = False) -> None:
    """List profiles with their routes and TTL limits."""
    registry = _registry()
    for profile in registry.profiles.values():
        if as_json:
            typer.echo(profile.model_dump_json())
            continue
        routes = " > ".join(
            ext if ext in registry.extensions else f"({ext}: not installed)"
            for ext in profile.routes
        )
        typer.echo(
            f"{profile.id}  routes: {routes}  ttl: {profile.ttl.min_s}..{profile.ttl.max_s}s "
            f"(default {profile.ttl.default_s}s)"
        )


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where to write *.schema.json.")],
) -> None:
    """Write the JSON Schema of every message and data file."""
    from schemas.export import export_json_schemas

    for path in export_json_schemas(directory):
        typer.echo(str(path))


def _amount(raw: str) -> Decimal:
    try:
        amount = Decimal(raw)
    except InvalidOperation:
        _die(f"not an amount: {raw!r} (use a decimal like 12.50)")
    if not amount.is_finite() or amount <= 0 or amount != amount.quantize(USD_QUANTUM):
        _die(f"amount must be positive with at most 6 decimals: {raw}")
    return amount


@credits_app.command("grant")
def credits_grant(
    tenant: Annotated[str, typer.Argument(help="Tenant to credit.")],
    amount: Annotated[str, typer.Argument(help="USD, e.g. 25 or 12.50.")],
    grant_id: Annotated[
        str | None, typer.Option(help="Idempotency key (default: a new one).")
    ] = None,
    note: Annotated[str, typer.Option(help="Why, for the ledger.")] = "",
) -> None:
    """Add prepaid credits. The same --grant-id is applied once, however often sent."""
    usd = _amount(amount)
    key = grant_id or uuid.uuid4().hex

    async def go() -> bool:
        async with Client(Settings.from_env().nats_url) as client:
            return await Ledger(client.js).grant(tenant, usd, key, note)

    try:
        applied = _run(go())
    except ValueError as exc:
        _die(f"invalid grant: {exc}".replace("\n", " "))
    typer.echo(f"grant-{key}: {'granted' if applied else 'already granted'} {usd} USD to {tenant}")


@credits_app.command("balance")
def credits_balance(
    tenant: Annotated[str, typer.Argument(help="Tenant to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """Balance, open holds and what is available for new sandboxes."""

    async def go() -> Balance:
        async with Client(Settings.from_env().nats_url) as client:
            return await Ledger(client.js).balance(tenant)

    balance = _run(go())
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


@credits_app.command("ledger")
def credits_ledger(
    tenant: Annotated[str, typer.Argument(help="Tenant to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """The tenant's journal, newest first."""

    async def go() -> list[LedgerEntry]:
        async with Client(Settings.from_env().nats_url) as client:
            return await Ledger(client.js).entries(tenant)

    for entry in reversed(_run(go())):
        if as_json:
            typer.echo(entry.model_dump_json())
        else:
            sign = {"grant": "+", "debit": "-"}.get(entry.kind, " ")
            typer.echo(
                f"{entry.at.isoformat()}  {entry.kind:<7}  {sign}{entry.amount_usd:.6f}"
                f"  {entry.entry_id}  {entry.note}".rstrip()
            )


@app.command()
def replay(
    subject: Annotated[
        str,
        typer.Option(
            help="sandbox.provision, sandbox.destroy, sandbox.meter.> (or one "
            "extension's) or billing.usage."
        ),
    ],
    since: Annotated[
        str | None, typer.Option(help="From this time: ISO 8601, or ago: 30m, 2h, 1d.")
    ] = None,
    from_seq: Annotated[int | None, typer.Option(help="From this stream sequence.")] = None,
    until: Annotated[str | None, typer.Option(help="Up to this time (same forms).")] = None,
    to_seq: Annotated[int | None, typer.Option(help="Up to this stream sequence.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's messages.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Say what would happen; publish nothing.")] = False,
    include_replays: Annotated[
        bool, typer.Option(help="Also replay messages that were replays themselves.")
    ] = False,
) -> None:
    """Publish stored messages of a subject again for their consumers. Handlers are
    idempotent: what was applied stays applied once; what was missed is applied."""
    from sandboxer.replay import Range, parse_time, stream_of
    from sandboxer.replay import replay as run_replay

    if (since and from_seq is not None) or (until and to_seq is not None):
        _die("give --since or --from-seq, and --until or --to-seq, not both")
    try:
        stream_of(subject)
        span = Range(
            from_seq=from_seq,
            to_seq=to_seq,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
        )
    except ValueError as exc:
        _die(str(exc))

    def progress(done: int, left: int) -> None:
        typer.echo(f"  {done} read, {left} left", err=True)

    async def go() -> Any:
        async with Client(Settings.from_env().nats_url) as client:
            await ensure_topology(client.js)
            return await run_replay(
                client.js,
                subject,
                span,
                tenant=tenant,
                dry_run=dry_run,
                include_replays=include_replays,
                progress=progress,
            )

    typer.echo(_run(go()).line())


@app.command()
def reconcile(
    extension: Annotated[
        str | None, typer.Option(help="Only this extension, e.g. ext.e2b.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would be done; change nothing.")] = False,
    grace: Annotated[
        float, typer.Option(help="Seconds a claim or an expiry is given before acting.")
    ] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Find this deployment's provider sandboxes ($SANDBOXER_DEPLOYMENT) and adopt,
    expire or destroy those whose claims disagree (see docs/cloud-adapters.md)."""
    from contextlib import AsyncExitStack

    from consumers.reconcile import Finding, Reconciler
    from consumers.worker import build_provisioner

    settings = Settings.from_env()

    async def go() -> list[Finding]:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(Client(settings.nats_url))
            await ensure_topology(client.js, replicas=settings.replicas)
            provisioner = await build_provisioner(settings, client.js, stack)
            return await Reconciler(provisioner, grace_s=grace).run(extension, dry_run=dry_run)

    try:
        findings = _run(go())
    except SandboxerError as exc:
        _die(f"{exc.code}: {exc}")
    if as_json:
        typer.echo(json.dumps([f.__dict__ for f in findings]))
        return
    for f in findings:
        verb = "would " if dry_run and f.action not in ("keep", "wait") else ""
        typer.echo(
            f"{f.extension_id:<14} {f.provider_sandbox_id:<28} {f.sandbox_id or '-':<28} "
            f"{verb}{f.action:<8} {f.reason}"
        )
    acted = sum(f.action not in ("keep", "wait") for f in findings)
    typer.echo(
        f"{len(findings)} sandbox(es) of deployment {settings.deployment}; "
        f"{acted} {'to act on' if dry_run else 'acted on'}",
        err=True,
    )


def _dead_letter(letter_id: int) -> Any:
    from consumers.deadletter import get_dead_letter

    async def go() -> Any:
        async with Client(Settings.from_env().nats_url) as client:
            return await get_dead_letter(client.js, letter_id)

    letter = _run(go())
    if letter is None:
        _die(f"no dead letter {letter_id} (see `sandboxer dlq ls`)")
    return letter


@dlq_app.command("ls")
def dlq_ls(
    consumer: Annotated[
        str | None, typer.Option(help="Only this consumer, e.g. provisioner-provision.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The kept messages, oldest first: id, consumer, origin, deliveries, why."""
    from consumers.deadletter import list_dead_letters

    async def go() -> list[Any]:
        async with Client(Settings.from_env().nats_url) as client:
            await ensure_topology(client.js)
            return await list_dead_letters(client.js, consumer)

    for letter in _run(go()):
        if as_json:
            typer.echo(json.dumps(letter.summary()))
            continue
        o = letter.origin
        typer.echo(
            f"{letter.id:>6}  {o.consumer:<22} {o.stream} seq {o.seq} ({o.subject}), "
            f"{o.deliveries} deliveries: {letter.reason[:160]}"
        )


@dlq_app.command("show")
def dlq_show(letter_id: int, as_json: JsonOpt = False) -> None:
    """One dead letter: where it came from, why, its headers and body."""
    letter = _dead_letter(letter_id)
    if as_json:
        body = letter.data.decode(errors="replace")
        typer.echo(
            json.dumps({**letter.summary(), "headers": letter.original_headers, "body": body})
        )
        return
    for key, value in letter.summary().items():
        typer.echo(f"{key:<11} {value}")
    for key, value in letter.original_headers.items():
        typer.echo(f"header     {key}: {value}")
    typer.echo(letter.data.decode(errors="replace"))


@dlq_app.command("retry")
def dlq_retry(
    letter_id: int,
    body: Annotated[
        Path | None, typer.Option(help="A fixed body (JSON) to send instead of the original.")
    ] = None,
) -> None:
    """Publish a dead letter again on its subject (after the cause is fixed), then drop
    it. Handlers are idempotent: what was already applied is not applied twice."""
    from consumers.deadletter import retry_dead_letter

    letter = _dead_letter(letter_id)
    fixed = body.read_bytes() if body is not None else None
    if fixed is not None:
        try:
            json.loads(fixed)
        except ValueError as exc:
            _die(f"{body} is not JSON: {exc}")

    async def go() -> int:
        async with Client(Settings.from_env().nats_url) as client:
            return int(await retry_dead_letter(client.js, letter, fixed))

    seq = _run(go())
    typer.echo(
        f"dead letter {letter_id} published again on {letter.origin.subject} "
        f"(seq {seq}) and dropped"
    )


@dlq_app.command("drop")
def dlq_drop(letter_id: int) -> None:
    """Forget a dead letter for good (logged)."""
    from consumers.deadletter import drop_dead_letter

    _setup_logging("WARNING")
    letter = _dead_letter(letter_id)

    async def go() -> None:
        async with Client(Settings.from_env().nats_url) as client:
            await drop_dead_letter(client.js, letter)

    _run(go())
    typer.echo(f"dead letter {letter_id} dropped")


@route_app.command("explain")
def route_explain(
    tenant: Annotated[str, typer.Option(help="Tenant to route for.")],
    profile: Annotated[str, typer.Option(help="Profile id, e.g. profile.burst-sandbox.")],
) -> None:
    """Which extension a provision would use now, and why the others would be skipped.
    Reads OpenBao ($BAO_ADDR) like a worker; prints key paths and versions, never keys."""
    from adapters.base import AdapterContext
    from adapters.openbao import CredentialResolver
    from sandboxer.routing import Router
    from sandboxer.settings import BaoSettings

    registry = _registry()
    try:
        chosen_profile = registry.profile(profile)
    except SandboxerError as exc:
        _die(f"{exc.code}: {exc}")
    bao = BaoSettings.from_env()

    async def go() -> list[tuple[str, str]]:
        async with Client(Settings.from_env().nats_url) as client:
            settings = Settings.from_env()
            adapters = registry.build_adapters(
                {
                    ext: AdapterContext(manifest, client.js, settings.deployment, settings.replicas)
                    for ext, manifest in registry.extensions.items()
                }
            )
            resolver = CredentialResolver(bao) if bao else None
            try:
                return await Router(adapters, registry.extensions, resolver).explain(
                    chosen_profile, tenant
                )
            finally:
                for adapter in adapters.values():
                    await adapter.aclose()
                if resolver is not None:
                    resolver.close()

    try:
        rows = _run(go())
    except SandboxerError as exc:
        _die(f"{exc.code}: {exc}")
    typer.echo(f"{profile} for tenant {tenant} (OpenBao: {bao.addr if bao else 'not configured'})")
    for position, (extension, verdict) in enumerate(rows, 1):
        typer.echo(f"  {position}. {extension:<16} {verdict}")


@finhub_app.command("export")
def finhub_export(
    record: Annotated[Path, typer.Option(help="A UsageRecord as JSON.")],
    url: Annotated[
        str | None, typer.Option(help="fin-hub endpoint (default: $SANDBOXER_FIN_HUB_URL).")
    ] = None,
) -> None:
    """POST one usage record to fin-hub by hand (Idempotency-Key = record_id)."""
    from adapters.finhub import FinHubClient, Verdict

    settings = Settings.from_env()
    target = url or settings.fin_hub_url
    if not target:
        _die("no fin-hub URL: set SANDBOXER_FIN_HUB_URL or pass --url")
    try:
        usage = UsageRecord.model_validate_json(record.read_bytes())
    except OSError as exc:
        _die(f"cannot read {record}: {exc.strerror}")
    except ValueError as exc:
        _die(f"{record} is not a UsageRecord: {exc}".replace("\n", " "))

    async def go() -> str:
        client = FinHubClient(
            target, token=Settings.fin_hub_token(), timeout_s=settings.fin_hub_timeout_s
        )
        try:
            outcome = await client.post(usage)
        finally:
            await client.aclose()
        if outcome.verdict is not Verdict.DELIVERED:
            _die(f"{usage.record_id} not delivered ({outcome.verdict.value}): {outcome.detail}")
        return outcome.detail

    typer.echo(f"{usage.record_id}: delivered ({asyncio.run(go())})")


def main() -> None:
    app()
