"""Commands for logical templates: `template build NAME[@VERSION]`, `template ls` and
`template show NAME[@VERSION]` (docs/templates.md)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Annotated

import typer
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from sandboxer.catalogue import Catalogue
from sandboxer.cli._common import (
    JsonOpt,
    die,
    load_registry,
    nats_client,
    run,
    template_app,
)
from sandboxer.client import Client
from sandboxer.connect import connection_of
from sandboxer.errors import NotFound
from sandboxer.topology import TEMPLATE_BUILD_SUBJECT, template_status_subject
from schemas import TemplateBuildRequest, TemplateEvent, TemplateManifest, TemplateRecord


def _manifest(reference: str) -> tuple[TemplateManifest, str]:
    """The manifest of `NAME[@VERSION]` and the version meant (its own if omitted)."""
    name, _, version = reference.partition("@")
    try:
        manifest = load_registry().template(name)
    except NotFound as exc:
        die(str(exc))
    return manifest, version or manifest.version


async def _ask(client: Client, request: TemplateBuildRequest) -> None:
    """Publish the build request; one clear line if JetStream did not take it (an
    identity that may not publish there gets no answer at all)."""
    try:
        await client.js.publish(TEMPLATE_BUILD_SUBJECT, request.model_dump_json().encode())
    except (NatsTimeout, NoRespondersError):
        die(
            "template.build was not accepted: no JetStream answer (only an operator may "
            "ask for template builds: docs/security.md)"
        )


def _record_line(record: TemplateRecord) -> str:
    providers = "  ".join(f"{ext}={entry.state}" for ext, entry in sorted(record.providers.items()))
    digest = record.digest[:19] if record.digest else "-"
    line = f"{record.reference:<28} {record.state:<9} {digest:<19}  {providers}"
    if record.error:
        line += f"  error={record.error.code}: {record.error.message}"
    return line.rstrip()


@template_app.command("build")
def template_build(
    reference: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="The template.")],
    request_id: Annotated[
        str | None, typer.Option(help="Idempotency key (a new one if omitted).")
    ] = None,
    wait: Annotated[bool, typer.Option(help="Follow the build to its end.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow it.")] = 3600.0,
    as_json: JsonOpt = False,
) -> None:
    """Build a template with Packer and register it on its providers (a template
    worker does it); shows the progress, exits 1 unless it ends ready everywhere."""
    manifest, version = _manifest(reference)
    request = TemplateBuildRequest(
        request_id=request_id or f"cli-{uuid.uuid4().hex[:16]}",
        name=manifest.name,
        version=version,
        requested_by="sandboxer template build",
    )

    async def go() -> TemplateEvent | None:
        async with nats_client() as client:
            nc = connection_of(client.js)
            events: asyncio.Queue[TemplateEvent] = asyncio.Queue()

            async def on_event(msg: object) -> None:
                event = TemplateEvent.model_validate_json(msg.data)  # type: ignore[attr-defined]
                if event.request_id == request.request_id:
                    await events.put(event)

            sub = await nc.subscribe(template_status_subject(manifest.name), cb=on_event)
            try:
                await _ask(client, request)
                if not wait:
                    return None
                async with asyncio.timeout(timeout):
                    while True:
                        event = await events.get()
                        if event.step == "done":
                            return event
                        if not as_json:
                            where = f"{event.extension_id}: " if event.extension_id else ""
                            typer.echo(f"{event.step}: {where}{event.message}", err=True)
            except TimeoutError:
                die(
                    f"no end of the build after {timeout:.0f} s; it goes on (see `sandboxer "
                    f"template show {manifest.reference}`)"
                )
            finally:
                await sub.unsubscribe()

    done = run(go())
    if done is None:
        typer.echo(f"build of {manifest.name}@{version} requested ({request.request_id})")
        return
    if as_json:
        typer.echo(done.model_dump_json())
    elif done.record is not None:
        typer.echo(_record_line(done.record))
    else:
        typer.echo(done.message)
    if done.record is None or done.record.state != "ready":
        raise typer.Exit(1)


@template_app.command("ls")
def template_ls(as_json: JsonOpt = False) -> None:
    """Every template version in the catalogue, with its state on each provider."""

    async def go() -> list[TemplateRecord]:
        async with nats_client() as client:
            return await Catalogue(client.js).all()

    records = run(go())
    if as_json:
        typer.echo(json.dumps([json.loads(r.model_dump_json()) for r in records]))
        return
    if not records:
        typer.echo("(no template built yet: sandboxer template build NAME)")
    for record in records:
        typer.echo(_record_line(record))


@template_app.command("show")
def template_show(
    reference: Annotated[str, typer.Argument(metavar="NAME[@VERSION]", help="The template.")],
    as_json: JsonOpt = False,
) -> None:
    """One template version: its image, digest and each provider's template id, state
    and reason."""
    manifest, version = _manifest(reference)

    async def go() -> TemplateRecord | None:
        async with nats_client() as client:
            found = await Catalogue(client.js).get(manifest.name, version)
        return found[0] if found else None

    record = run(go())
    if record is None:
        die(f"{manifest.name}@{version} was never built (sandboxer template build)")
    if as_json:
        typer.echo(record.model_dump_json())
        return
    typer.echo(f"{record.reference}  {record.state}")
    typer.echo(f"  image   {record.image or '-'}")
    typer.echo(f"  digest  {record.digest or '-'}  (packer {record.packer_version or '-'})")
    if record.error:
        typer.echo(f"  error   {record.error.code}: {record.error.message}")
    for ext in manifest.providers:
        entry = record.providers.get(ext)
        if entry is None:
            typer.echo(f"  {ext:<16} not registered")
            continue
        reason = f"  ({entry.reason})" if entry.reason else ""
        typer.echo(
            f"  {ext:<16} {entry.state:<9} {entry.template_id or '-'}  "
            f"updated {entry.updated_at:%Y-%m-%dT%H:%M:%SZ}{reason}"
        )
