"""Commands that run the service: `worker`, `billing`, `export`, `templates`, and `dev`
(worker, billing and the template worker on an embedded nats-server, for local use)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from nats.errors import NoServersError

from sandboxer.cli._common import (
    LogLevelOpt,
    app,
    die,
    load_registry,
    run_service,
    settings,
    setup_logging,
)
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.errors import ManifestError
from sandboxer.settings import NatsAuth, Settings, SettingsError
from sandboxer.topology import ensure_topology

#: What `sandboxer dev` grants the `demo` tenant, once per state folder.
DEMO_CREDITS = Decimal("10")


def _serve(service: Callable[[Settings], Coroutine[Any, Any, None]], log_level: str) -> None:
    """Run `service` until SIGTERM; a wrong manifest or an unreachable NATS is one line
    and exit code 1."""
    from consumers.app import ConnectionLost

    setup_logging(log_level)
    current = settings()
    try:
        run_service(service(current))
    except (ManifestError, SettingsError) as exc:
        die(str(exc))
    except ConnectionLost as exc:
        die(f"{exc}; exiting so that a supervisor starts it again")
    except (NoServersError, OSError) as exc:
        die(f"cannot reach NATS at {current.nats_where}: {exc}")


@app.command()
def worker(log_level: LogLevelOpt = "INFO") -> None:
    """Run a provisioner worker against $SANDBOXER_NATS_URL until SIGTERM."""
    from consumers.worker import run_worker

    _serve(run_worker, log_level)


@app.command()
def billing(log_level: LogLevelOpt = "INFO") -> None:
    """Run the billing consumer (debits, usage records) and, if $SANDBOXER_FIN_HUB_URL is
    set, the fin-hub exporter, until SIGTERM."""
    from consumers.billing import run_billing

    _serve(run_billing, log_level)


@app.command()
def templates(log_level: LogLevelOpt = "INFO") -> None:
    """Run a template worker (Packer builds, provider registrations) until SIGTERM; it
    needs `packer` on PATH (docs/templates.md)."""
    from consumers.templates import run_template_worker

    _serve(run_template_worker, log_level)


@app.command()
def export(log_level: LogLevelOpt = "INFO") -> None:
    """Run the fin-hub exporter alone ($SANDBOXER_FIN_HUB_URL), until SIGTERM: for a
    deployment that gives the exporter its own identity (docs/security.md)."""
    from consumers.export import run_exporter

    if not settings().fin_hub_url:
        die("the exporter needs SANDBOXER_FIN_HUB_URL")
    _serve(run_exporter, log_level)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Port of the embedded NATS server.")] = 4222,
    state_dir: Annotated[Path, typer.Option(help="Where NATS keeps its data.")] = Path(
        ".sandboxer"
    ),
    log_level: LogLevelOpt = "INFO",
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
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="Run NATS with the generated authorization (docs/security.md): every "
            "process on its own least-privilege identity, keys in <state-dir>/security/. "
            "Without it the bus is trusted: anyone who reaches the port can do anything.",
        ),
    ] = False,
) -> None:
    """Start an embedded nats-server with JetStream, a worker and billing, for local use."""
    from sandboxer.dev.servers import EmbeddedNats

    setup_logging(log_level)
    stack = ExitStack()
    config = _secure_config(state_dir) if secure else None
    server = EmbeddedNats(state_dir / "nats", port=port, config=config)
    try:
        stack.enter_context(server)
    except (RuntimeError, TimeoutError, FileNotFoundError) as exc:
        die(f"cannot start nats-server: {exc} (try --port)")
    current = replace(settings(), nats_url=server.url)
    shell_env = {"SANDBOXER_NATS_URL": server.url}
    # With a fake cloud, a profile whose sandboxes serve a port: `connect` reaches it.
    profile = "profile.modal-web" if fake_modal else "profile.burst-sandbox"
    profile = "profile.web-sandbox" if fake_e2b else profile
    if fake_e2b or fake_modal:
        from sandboxer.dev.providers import start_fake_providers

        try:
            fakes = start_fake_providers(stack, current, state_dir, e2b=fake_e2b, modal=fake_modal)
        except (RuntimeError, TimeoutError, FileNotFoundError, ImportError) as exc:
            stack.close()
            die(f"cannot start the fake providers: {exc}")
        current = fakes.settings
        shell_env.update(fakes.env)
        for line in fakes.said:
            typer.echo(f"sandboxer dev: {line}", err=True)
    env_file = _write_env(state_dir / "dev.env", shell_env)
    # Reconcile what has a key here (an extension it cannot list makes it exit 1).
    only = "" if fake_e2b == fake_modal else f" --extension ext.{'e2b' if fake_e2b else 'modal'}"
    env = f"env $(cat {env_file}) " if port != 4222 or fake_e2b or fake_modal else ""
    identities = _identities(current, state_dir / "security") if secure else None
    if identities:
        env = f"env $(cat {env_file}) $(cat {state_dir}/security/operator.env) "
        typer.echo(
            f"sandboxer dev: secure mode: each process has its own identity; as the demo "
            f"upstream:\n  env $(cat {state_dir}/security/consumer-demo-app.env) "
            f".venv/bin/sandboxer provision --tenant demo --profile {profile} --wait",
            err=True,
        )
    else:
        typer.echo(
            "sandboxer dev: the bus is trusted (no --secure): anyone on it is anyone", err=True
        )
    typer.echo(
        f"sandboxer dev: NATS with JetStream on {server.url}, state in {state_dir}/\n"
        f"In another shell:\n"
        f"  {env}.venv/bin/sandboxer provision --tenant demo --profile {profile} --wait\n"
        + (f"  {env}.venv/bin/sandboxer connect <sandbox_id>\n" if fake_e2b or fake_modal else "")
        + f"  {env}.venv/bin/sandboxer extend <sandbox_id> --add 300\n"
        f"  {env}.venv/bin/sandboxer destroy <sandbox_id> --wait\n"
        f"  {env}.venv/bin/sandboxer ls\n"
        f"  {env}.venv/bin/sandboxer credits balance demo\n"
        f"  {env}.venv/bin/sandboxer credits ledger demo\n"
        f"  {env}.venv/bin/sandboxer route explain --tenant demo --profile {profile}\n"
        f"  {env}.venv/bin/sandboxer template build python-web\n"
        f"  {env}.venv/bin/sandboxer reconcile --dry-run{only}\n"
        f"Ctrl-C stops the worker and the server.",
        err=True,
    )
    try:
        run_service(_dev_services(current, identities))
    except (ManifestError, SettingsError) as exc:
        die(str(exc))
    finally:
        stack.close()


def _write_env(path: Path, values: dict[str, str]) -> Path:
    """What a second shell needs to reach this dev stack (an OpenBao token that may read
    keys, nothing else), readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def _secure_config(state_dir: Path) -> Path:
    """The embedded server's configuration in secure mode: the authorization that
    `sandboxer security generate` writes (kept, keys and all, from run to run)."""
    from sandboxer.access import generate

    generate(state_dir / "security", sorted(load_registry().consumers))
    config = state_dir / "nats-secure.conf"
    config.write_text('include "security/nats-auth.conf"\n')
    return config


def _identities(current: Settings, directory: Path) -> dict[str, Settings]:
    """The settings of each dev process, as the identity its `.env` file says."""
    from sandboxer.access import read_env_file

    return {
        role: replace(
            current,
            nats_auth=NatsAuth.from_env(read_env_file(directory / f"{role}.env")),
        )
        for role in ("worker", "billing", "templates", "operator")
    }


async def _dev_services(current: Settings, identities: dict[str, Settings] | None) -> None:
    """Worker, billing and the template worker in one process (each as its own identity
    in secure mode), and credits for the demo tenant (granted as the operator)."""
    from consumers.billing import run_billing
    from consumers.templates import run_template_worker
    from consumers.worker import run_worker

    who = identities or {
        "worker": current,
        "billing": current,
        "templates": current,
        "operator": current,
    }
    operator = who["operator"]
    async with Client(operator.nats_url, auth=operator.nats_auth) as client:
        await ensure_topology(client.js, replicas=current.replicas)
        if await Ledger(client.js).grant("demo", DEMO_CREDITS, "dev-welcome", "sandboxer dev"):
            logging.getLogger("sandboxer.dev").info("granted %s USD to tenant demo", DEMO_CREDITS)
    stop = asyncio.Event()
    await asyncio.gather(
        run_worker(who["worker"], stop),
        run_billing(who["billing"], stop),
        run_template_worker(who["templates"], stop),
    )
