"""What every `sandboxer` command shares: the command groups, one-line failures, and
how statuses are printed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import uvloop
from nats.errors import NoServersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
from pydantic import ValidationError

from adapters.registry import Registry
from sandboxer import logs
from sandboxer.client import Client, WaitTimedOut
from sandboxer.errors import ManifestError, validation_problems
from sandboxer.settings import Settings, SettingsError
from sandboxer.topology import TopologyMissing, require_topology
from schemas import SandboxState, SandboxStatus

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
policy_app = typer.Typer(
    help="Tenants' limits: consumer profiles and operators' overrides (docs/policy.md).",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")
template_app = typer.Typer(
    help="Logical templates: Packer builds registered on every provider.", no_args_is_help=True
)
app.add_typer(template_app, name="template")
security_app = typer.Typer(
    help="Identities and permissions on NATS (docs/security.md).", no_args_is_help=True
)
app.add_typer(security_app, name="security")

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
LogLevelOpt = Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")]


def die(reason: str) -> NoReturn:
    """Say why on one line of stderr, and exit 1."""
    typer.echo(f"sandboxer: {reason}", err=True)
    raise typer.Exit(1)


def invalid(what: str, exc: ValueError) -> NoReturn:
    """`invalid <what>: field: problem; …` on one line, never pydantic's own text."""
    problems = validation_problems(exc) if isinstance(exc, ValidationError) else str(exc)
    die(f"invalid {what}: {problems}".replace("\n", " "))


def settings() -> Settings:
    """The settings of this process, or one line naming the variable that is wrong."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        die(str(exc))


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine, turning connection trouble into one clear line."""
    url = settings().nats_where
    try:
        return asyncio.run(coro)
    except WaitTimedOut as exc:
        die(f"{exc}; the request was sent (see `sandboxer status {exc.sandbox_id}`)")
    except TopologyMissing as exc:
        die(f"no sandboxer streams on {url} ({exc}); start a worker, which creates them")
    except (TimeoutError, NatsTimeout):  # before OSError: TimeoutError is one since 3.11
        die("NATS did not answer in time (or this identity may not do that)")
    except (NoServersError, OSError) as exc:
        die(f"cannot reach NATS at {url} ({exc}); is `sandboxer dev` running?")
    except (NoStreamResponseError, ServiceUnavailableError):
        die(f"no sandboxer streams on {url}; start a worker first")
    except ManifestError as exc:
        die(str(exc))


def run_service(coro: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop: it halves the event loop's share of the CPU
    that every message costs (see docs/architecture.md, "Throughput")."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(coro)


def setup_logging(level: str) -> None:
    """Log at `level` in the format `SANDBOXER_LOG_FORMAT` names."""
    logs.setup_logging(level, settings().log_format)


def load_registry() -> Registry:
    """The validated `extensions/`, or one line naming the wrong file and field."""
    try:
        return Registry.load(settings().extensions_dir)
    except ManifestError as exc:
        die(str(exc))


def print_status(status: SandboxStatus, as_json: bool) -> None:
    if as_json:
        typer.echo(status.model_dump_json())
        return
    line = f"{status.sandbox_id}  {status.state}"
    if status.extension_id:
        line += f"  {status.extension_id}"
    if status.provider_sandbox_id:
        line += f"  provider_id={status.provider_sandbox_id}"
    if status.template_id:
        line += f"  template={status.template_id}"
    if status.expires_at and status.state is SandboxState.READY:
        line += f"  expires_at={status.expires_at.isoformat()}"
    if status.actual_usd is not None:
        line += f"  actual_usd={status.actual_usd}"
    elif status.estimate_usd is not None:
        line += f"  estimate_usd={status.estimate_usd}"
    if status.error:
        line += f"  error={status.error.code}: {status.error.message}"
    typer.echo(line)


def exit_for(status: SandboxStatus | None, as_json: bool) -> None:
    """Print a request's answer; exit 1 if it failed."""
    if status is None:
        return
    print_status(status, as_json)
    if status.state is SandboxState.FAILED:
        raise typer.Exit(1)


def _progress(sandbox_id: str, status: SandboxStatus | None, elapsed_s: float) -> None:
    state = status.state.value if status else "not claimed yet"
    typer.echo(f"sandboxer: {sandbox_id} {state} ({elapsed_s:.0f} s)", err=True)


@asynccontextmanager
async def nats_client() -> AsyncIterator[Client]:
    """A client of the running sandboxer this process is configured for, saying on
    stderr how a wait goes. Its streams must be there already: no command but the
    service creates or changes them (an upstream identity may not look, and need not)."""
    current = settings()
    async with Client(
        current.nats_url,
        auth=current.nats_auth,
        consumer=current.consumer,
        progress=_progress,
    ) as c:
        if current.consumer is None:
            await require_topology(c.js)
        yield c
