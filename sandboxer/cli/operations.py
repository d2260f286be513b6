"""Commands for operators: `replay`, `reconcile`, `dlq ls|show|retry|drop`,
`route explain` and `security generate|show`."""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from nats.errors import NoServersError

from adapters.routing import Explanation
from sandboxer.cli._common import (
    JsonOpt,
    app,
    die,
    dlq_app,
    load_registry,
    nats_client,
    route_app,
    run,
    security_app,
    settings,
    setup_logging,
)
from sandboxer.connect import connection_of
from sandboxer.errors import SandboxerError
from sandboxer.topology import TopologyMissing


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
    as_json: JsonOpt = False,
) -> None:
    """Publish stored messages of a subject again for their consumers. Handlers are
    idempotent: what was applied stays applied once; what was missed is applied."""
    from consumers.replay import Range, parse_time, stream_of
    from consumers.replay import replay as run_replay

    if (since and from_seq is not None) or (until and to_seq is not None):
        die("give --since or --from-seq, and --until or --to-seq, not both")
    try:
        stream_of(subject)
        span = Range(
            from_seq=from_seq,
            to_seq=to_seq,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
        )
    except ValueError as exc:
        die(str(exc))

    registry = load_registry()

    def progress(done: int, left: int) -> None:
        typer.echo(f"  {done} read, {left} left", err=True)

    async def go() -> Any:
        async with nats_client() as client:
            return await run_replay(
                client.js,
                subject,
                span,
                registry=registry,
                tenant=tenant,
                dry_run=dry_run,
                include_replays=include_replays,
                progress=progress,
            )

    summary = run(go())
    typer.echo(json.dumps(summary.as_dict()) if as_json else summary.line())


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
    from consumers.reconcile import ACTIONS_TAKEN, Finding
    from consumers.wiring import open_worker

    current = settings()

    async def go() -> list[Finding]:
        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(nats_client())
            parts = await open_worker(current, client.js, stack)
            reconciler = parts.reconciler(grace_s=grace)
            return await reconciler.run(extension, dry_run=dry_run)

    try:
        findings = run(go())
    except SandboxerError as exc:
        die(f"{exc.code}: {exc}")
    unlisted = [f for f in findings if f.action == "unlisted"]
    if as_json:
        typer.echo(json.dumps([f.__dict__ for f in findings]))
    else:
        for f in findings:
            verb = "would " if dry_run and f.action in ACTIONS_TAKEN else ""
            typer.echo(
                f"{f.extension_id:<14} {f.provider_sandbox_id:<28} {f.sandbox_id or '-':<28} "
                f"{verb}{f.action:<8} {f.reason}"
            )
        listed = len(findings) - len(unlisted)
        acted = sum(f.action in ACTIONS_TAKEN for f in findings)
        typer.echo(
            f"{listed} sandbox(es) of deployment {current.deployment}; "
            f"{acted} {'to act on' if dry_run else 'acted on'}",
            err=True,
        )
    if unlisted:
        die(
            f"could not list the sandboxes of {', '.join(f.extension_id for f in unlisted)}"
            " (see above): they were not reconciled"
        )


def _dead_letter(letter_id: int) -> Any:
    from consumers.deadletter import get_dead_letter

    async def go() -> Any:
        async with nats_client() as client:
            return await get_dead_letter(client.js, letter_id)

    letter = run(go())
    if letter is None:
        die(f"no dead letter {letter_id} (see `sandboxer dlq ls`)")
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
        async with nats_client() as client:
            return await list_dead_letters(client.js, consumer)

    for letter in run(go()):
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
    as_json: JsonOpt = False,
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
            die(f"{body} is not JSON: {exc}")

    async def go() -> int:
        async with nats_client() as client:
            return int(await retry_dead_letter(client.js, letter, fixed))

    seq = run(go())
    if as_json:
        said = {"id": letter_id, "subject": letter.origin.subject, "seq": seq, "dropped": True}
        typer.echo(json.dumps(said))
        return
    typer.echo(
        f"dead letter {letter_id} published again on {letter.origin.subject} "
        f"(seq {seq}) and dropped"
    )


@dlq_app.command("drop")
def dlq_drop(letter_id: int, as_json: JsonOpt = False) -> None:
    """Forget a dead letter for good (logged)."""
    from consumers.deadletter import drop_dead_letter

    setup_logging("WARNING")
    letter = _dead_letter(letter_id)

    async def go() -> None:
        async with nats_client() as client:
            await drop_dead_letter(client.js, letter)

    run(go())
    if as_json:
        typer.echo(json.dumps({"id": letter_id, "dropped": True}))
        return
    typer.echo(f"dead letter {letter_id} dropped")


@route_app.command("explain")
def route_explain(
    tenant: Annotated[str, typer.Option(help="Tenant to route for.")],
    profile: Annotated[str, typer.Option(help="Profile id, e.g. profile.burst-sandbox.")],
    as_json: JsonOpt = False,
) -> None:
    """Which extension a provision would use now, and why the others would be skipped.
    Reads OpenBao ($BAO_ADDR) like a worker; prints key paths and versions, never keys.
    Exits 1 when no route is eligible."""
    from consumers.wiring import open_providers

    current = settings()

    from consumers.policy import Policies

    async def go() -> tuple[Explanation, str, str]:
        async with AsyncExitStack() as stack:
            # With NATS, provider accounts' slots are looked at too (never taken).
            nats = None
            try:
                client = await stack.enter_async_context(nats_client())
                nats = connection_of(client.js)
            except (OSError, NoServersError, TopologyMissing):
                pass
            providers = await open_providers(current, stack, nats)
            chosen = providers.registry.profile(profile)
            policies = Policies(providers.registry)
            try:
                policies.admit(tenant, chosen, None)
                admitted = "admitted"
            except SandboxerError as exc:
                admitted = f"{exc.code}: {exc}"
            consumer = providers.registry.consumer_of(tenant)
            limits = consumer.tenant_limits if consumer else None
            shown = (
                ", ".join(f"{k}={v}" for k, v in limits.model_dump(mode="json").items() if v)
                if limits and not limits.unlimited
                else "none"
            )
            source = consumer.id if consumer else "no consumer profile"
            said = f"{shown} ({source}; `sandboxer policy show` for overrides)"
            return await providers.router.explain(chosen, tenant), admitted, said

    try:
        answer, admitted, limits = run(go())
    except SandboxerError as exc:
        die(f"{exc.code}: {exc}")
    if as_json:
        policy = {"admission": admitted, "limits": limits}
        body = {"profile": profile, "tenant": tenant, **answer.as_dict(), "policy": policy}
        typer.echo(json.dumps(body))
    else:
        bao = current.bao.addr if current.bao else "not configured"
        typer.echo(f"{profile} for tenant {tenant} (OpenBao: {bao})")
        typer.echo(f"  policy: {admitted}; limits: {limits}")
        for position, (extension, verdict) in enumerate(answer.rows, 1):
            typer.echo(f"  {position}. {extension:<16} {verdict}")
    if admitted != "admitted":
        die(f"{admitted}")
    if answer.chosen is None:
        die(f"no_route: no route of {profile} is eligible for tenant {tenant}")


@security_app.command("generate")
def security_generate(
    directory: Annotated[Path, typer.Argument(help="Where to write the files (kept secret).")],
    rotate: Annotated[
        list[str] | None,
        typer.Option(help="Make a new key for this identity (repeatable); others are kept."),
    ] = None,
) -> None:
    """Write nats-server's authorization (nats-auth.conf: one nkey user per role and
    upstream consumer, with least-privilege permissions) and each identity's nkey seed
    and environment (<identity>.nk, <identity>.env). Run again after adding a consumer
    or to rotate a key, then reload nats-server."""
    from sandboxer.access import generate

    registry = load_registry()
    try:
        written = generate(directory, sorted(registry.consumers), rotate=tuple(rotate or ()))
    except ValueError as exc:
        die(str(exc))
    for path in written:
        typer.echo(str(path))
    typer.echo(
        f"include {directory / 'nats-auth.conf'} from nats-server.conf, reload the server, "
        "and start each process with its <identity>.env",
        err=True,
    )


@security_app.command("show")
def security_show(
    identity: Annotated[
        str, typer.Argument(help="worker, billing, exporter, operator or consumer-<name>.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """What an identity may publish and subscribe to."""
    from sandboxer.access import permissions

    try:
        allowed = permissions(identity)
    except ValueError as exc:
        die(str(exc))
    if as_json:
        said = {
            "publish": list(allowed.publish),
            "subscribe": list(allowed.subscribe),
            "allow_responses": allowed.allow_responses,
        }
        typer.echo(json.dumps({"identity": identity, **said}))
        return
    for subject in allowed.publish:
        typer.echo(f"publish    {subject}")
    for subject in allowed.subscribe:
        typer.echo(f"subscribe  {subject}")
    if allowed.allow_responses:
        typer.echo("responds   to the requests it receives (allow_responses)")
