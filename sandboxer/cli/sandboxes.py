"""Commands for sandboxes and what they are made of: `provision`, `destroy`, `status`,
`ls`, `connect`, `extend`, `extensions`, `profiles`, `schemas export`."""

from __future__ import annotations

import json
import shlex
import uuid
from pathlib import Path
from typing import Annotated

import typer
from nats.errors import NoRespondersError
from pydantic import TypeAdapter, ValidationError

from sandboxer.cli._common import (
    JsonOpt,
    app,
    die,
    exit_for,
    invalid,
    load_registry,
    nats_client,
    print_status,
    run,
    schemas_app,
)
from sandboxer.client import ConnectRefused
from sandboxer.ids import sandbox_id_for
from schemas import (
    ConnectGrant,
    Credential,
    DestroyRequest,
    ExtendRequest,
    ProvisionRequest,
    SandboxId,
    SandboxState,
    SandboxStatus,
)

_SANDBOX_ID: TypeAdapter[str] = TypeAdapter(SandboxId)


def _check_sandbox_id(raw: str) -> None:
    try:
        _SANDBOX_ID.validate_python(raw)
    except ValidationError:
        die(f"not a sandbox id: {raw!r} (sbx- and 24 hex digits, as provision prints)")


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
        invalid("request", exc)

    async def go() -> SandboxStatus | None:
        async with nats_client() as client:
            return await client.provision(request, wait_s=timeout if wait else None)

    status = run(go())
    if status is None:
        sandbox_id = sandbox_id_for(request.tenant, request.request_id)
        typer.echo(json.dumps({"sandbox_id": sandbox_id}) if as_json else sandbox_id)
    exit_for(status, as_json)


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
    _check_sandbox_id(sandbox_id)

    async def go() -> SandboxStatus | None:
        async with nats_client() as client:
            owner = tenant
            if owner is None:
                current = await client.status(sandbox_id)
                if current is None:
                    die(f"not_found: no sandbox {sandbox_id}")
                owner = current.tenant
            request = DestroyRequest(
                request_id=f"cli-{uuid.uuid4().hex}",
                tenant=owner,
                sandbox_id=sandbox_id,
                reason=reason,
            )
            return await client.destroy(request, wait_s=timeout if wait else None)

    try:
        exit_for(run(go()), as_json)
    except ValueError as exc:
        invalid("request", exc)


@app.command()
def extend(
    sandbox_id: Annotated[str, typer.Argument(help="A ready sandbox.")],
    ttl: Annotated[
        int | None, typer.Option(help="Its new lifetime in seconds, counted from its creation.")
    ] = None,
    add: Annotated[int | None, typer.Option(help="Seconds added to its expiry.")] = None,
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key (default: a new one).")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the answer.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 60.0,
    as_json: JsonOpt = False,
) -> None:
    """Give a ready sandbox a longer life (its credit hold grows first), and print its
    status with the new `expires_at`."""
    _check_sandbox_id(sandbox_id)
    if (ttl is None) == (add is None):
        die("give exactly one of --ttl and --add")

    async def go() -> SandboxStatus | None:
        async with nats_client() as client:
            current = await client.status(sandbox_id)
            if current is None:
                die(f"not_found: no sandbox {sandbox_id}")
            try:
                request = ExtendRequest(
                    request_id=request_id or f"cli-{uuid.uuid4().hex}",
                    tenant=current.tenant,
                    sandbox_id=sandbox_id,
                    ttl_s=ttl,
                    add_s=add,
                )
            except ValueError as exc:
                invalid("request", exc)
            return await client.extend(request, wait_s=timeout if wait else None)

    answer = run(go())
    if answer is not None and answer.error is not None:
        print_status(answer, as_json)
        raise typer.Exit(1)
    exit_for(answer, as_json)


@app.command()
def status(
    sandbox_id: Annotated[str, typer.Argument(help="The sandbox to look up.")],
    as_json: JsonOpt = False,
) -> None:
    """Print the stored status of a sandbox."""
    _check_sandbox_id(sandbox_id)

    async def go() -> SandboxStatus | None:
        async with nats_client() as client:
            return await client.status(sandbox_id)

    found = run(go())
    if found is None:
        die(f"not_found: no sandbox {sandbox_id}")
    print_status(found, as_json)


@app.command("ls")
def list_sandboxes(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
    state: Annotated[SandboxState | None, typer.Option(help="Only in this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List sandboxes, newest first."""

    async def go() -> list[SandboxStatus]:
        async with nats_client() as client:
            return await client.statuses()

    rows = [
        s
        for s in run(go())
        if (tenant is None or s.tenant == tenant) and (state is None or s.state is state)
    ]
    rows.sort(key=lambda s: s.created_at, reverse=True)
    for row in rows:
        print_status(row, as_json)


@app.command()
def extensions(as_json: JsonOpt = False) -> None:
    """List installed extensions and their pricing."""
    for manifest in load_registry().extensions.values():
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
    registry = load_registry()
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
    """Write the JSON Schema of every message and data file, and of each installed
    extension's meter event (`MeterEvent.<extension_id>.schema.json`)."""
    from schemas.export import export_json_schemas

    registry = load_registry()
    meter_fields = {ext: cls.MeterFields for ext, cls in registry.adapter_classes.items()}
    for path in export_json_schemas(directory, meter_fields):
        typer.echo(str(path))


@schemas_app.command("asyncapi")
def schemas_asyncapi(
    output: Annotated[Path | None, typer.Option(help="Write it here (default: print it).")] = None,
) -> None:
    """The AsyncAPI 3 document of every subject and message (docs/asyncapi.json)."""
    from consumers.contract import asyncapi_document

    registry = load_registry()
    meter_fields = {ext: cls.MeterFields for ext, cls in registry.adapter_classes.items()}
    text = json.dumps(asyncapi_document(meter_fields), indent=2, sort_keys=True) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text)
    typer.echo(str(output))


@app.command()
def connect(
    sandbox_id: Annotated[str, typer.Argument(help="A ready sandbox.")],
    port: Annotated[int | None, typer.Option(help="Only this port.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print how to reach a sandbox's ports, with their credentials, and a `curl` line
    for each (the credentials are fetched for you, and never stored)."""
    _check_sandbox_id(sandbox_id)

    async def go() -> ConnectGrant:
        async with nats_client() as client:
            current = await client.status(sandbox_id)
            if current is None:
                die(f"not_found: no sandbox {sandbox_id}")
            try:
                return await client.connect(sandbox_id, current.tenant, current.owner, port)
            except ConnectRefused as exc:
                die(str(exc))
            except NoRespondersError:
                die("no worker answers connect requests; is one running?")

    grant = run(go())
    if as_json:
        typer.echo(grant.model_dump_json())
        return
    if not grant.credentials and grant.control is None:
        die(f"{sandbox_id} declares no ports (its profile has none)")
    for credential in grant.credentials:
        typer.echo(describe(credential))
    if grant.control is not None:
        sdk = ", ".join(f"{k}={v}" for k, v in grant.control_sdk.items())
        typer.echo(f"control  {grant.control.url}  ({sdk}; docs/reachability.md)")
        typer.echo(f"  {grant.control.auth_name}: {_secret(grant.control)}")


def _secret(credential: Credential) -> str:
    return credential.secret.get_secret_value() if credential.secret else ""


def describe(credential: Credential) -> str:
    """A port's endpoint and credential for a person, with a ready-to-run `curl` line
    (or, for a raw TCP port, its host and port)."""
    where = credential.url or f"{credential.host}:{credential.host_port}"
    lines = [f"port {credential.port}  {where}  auth={credential.auth}"]
    if credential.expires_at:
        lines[0] += f"  expires_at={credential.expires_at.isoformat()}"
    if credential.url is None:
        return lines[0]
    secret = shlex.quote(_secret(credential))
    url = shlex.quote(credential.url)
    if credential.auth == "header":
        lines.append(f"  curl -H {shlex.quote(f'{credential.auth_name}: ')}{secret} {url}")
    elif credential.auth == "bearer":
        lines.append(f"  curl -H 'Authorization: Bearer '{secret} {url}")
    elif credential.auth == "query":
        lines.append(f"  curl {shlex.quote(f'{credential.url}?{credential.auth_name}=')}{secret}")
    else:
        lines.append(f"  curl {url}")
    return "\n".join(lines)
