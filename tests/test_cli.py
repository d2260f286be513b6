"""The `sandboxer` command: exit codes, one-line reasons, and a real round trip."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import hvac
import pytest
import yaml
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from typer.core import TyperGroup
from typer.main import get_command
from typer.testing import CliRunner

from sandboxer.cli import app
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.servers import free_port
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import SandboxState
from tests.conftest import ROOT, Start, WorkerHandle
from tests.helpers import (
    Cluster,
    provision_by_cli,
    sandboxer,
    until_topology,
    wait_for_state,
)

runner = CliRunner()


async def test_provision_wait_then_destroy(settings: Settings, worker: WorkerHandle) -> None:
    code, out, err = await sandboxer(
        settings,
        "provision",
        "--tenant",
        "demo",
        "--profile",
        "profile.burst-sandbox",
        "--wait",
        "--json",
    )
    assert code == 0, err
    status = json.loads(out)
    assert status["state"] == "ready" and status["extension_id"] == "ext.saas-stub"

    code, out, err = await sandboxer(settings, "destroy", status["sandbox_id"])
    assert code == 0, err
    assert " destroyed " in out

    code, out, _ = await sandboxer(settings, "ls", "--tenant", "demo")
    assert code == 0 and status["sandbox_id"] in out

    code, out, _ = await sandboxer(settings, "status", status["sandbox_id"], "--json")
    assert code == 0 and json.loads(out)["state"] == "destroyed"


async def test_failures_exit_non_zero_with_one_line(
    settings: Settings, worker: WorkerHandle
) -> None:
    code, out, err = await sandboxer(
        settings, "provision", "--tenant", "demo", "--profile", "profile.nope", "--wait"
    )
    assert code == 1 and "unknown_profile" in out

    code, _, err = await sandboxer(settings, "status", "sbx-" + "0" * 24)
    assert code == 1 and err.strip().count("\n") == 0 and "not_found" in err

    code, _, err = await sandboxer(settings, "destroy", "sbx-" + "0" * 24)
    assert code == 1 and "not_found" in err


async def test_unreachable_nats_is_one_clear_line() -> None:
    unreachable = Settings(nats_url=f"nats://127.0.0.1:{free_port()}")
    code, _, err = await sandboxer(unreachable, "status", "sbx-" + "0" * 24)
    assert code == 1
    assert err.strip().count("\n") == 0 and "cannot reach NATS" in err


def test_invalid_provision_input_is_rejected_before_publishing() -> None:
    result = runner.invoke(app, ["provision", "--tenant", "a.b", "--profile", "profile.x"])
    assert result.exit_code == 1
    assert "invalid request" in result.output


def test_profiles_and_extensions_list_the_shipped_files() -> None:
    profiles = runner.invoke(app, ["profiles"])
    assert profiles.exit_code == 0
    assert "profile.burst-sandbox" in profiles.output and "profile.e2b-burst" in profiles.output
    extensions = runner.invoke(app, ["extensions", "--json"])
    assert extensions.exit_code == 0
    ids = [json.loads(line)["id"] for line in extensions.output.splitlines()]
    assert ids == sorted(path.stem for path in (ROOT / "extensions").glob("ext.*.yaml"))


def test_schemas_export_writes_files(tmp_path: Path) -> None:
    result = runner.invoke(app, ["schemas", "export", str(tmp_path)])
    assert result.exit_code == 0
    assert (tmp_path / "ProvisionRequest.schema.json").exists()


def test_compose_services_run_existing_cli_commands() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    commands = group.commands
    checked = 0
    for name, service in compose["services"].items():
        command = service.get("command")
        if command and command[0] == "sandboxer":
            assert command[1] in commands, f"compose service {name}: no `sandboxer {command[1]}`"
            checked += 1
    assert checked >= 1


def test_compose_drains_waits_for_health_and_stays_on_loopback() -> None:
    text = (ROOT / "compose.yaml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
        for needed, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, f"{name} -> {needed}: {how}"
            assert "healthcheck" in services[needed], f"{needed} has no health check"
        if service.get("command", [""])[0] == "sandboxer":
            grace = service.get("stop_grace_period", "10s")
            assert int(grace.removesuffix("s")) >= Settings.drain_timeout_s + 10, name
            assert "healthcheck" in service, f"{name} has no health check"
    header = [line for line in text.splitlines() if line.startswith("#")]
    grants = [i for i, line in enumerate(header) if "credits grant" in line]
    provisions = [i for i, line in enumerate(header) if "sandboxer provision" in line]
    assert grants and provisions and max(grants) < min(provisions)


def test_a_wildcard_is_no_tenant() -> None:
    for command in (["credits", "balance", "*"], ["credits", "ledger", ">"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 1 and "not a tenant name" in result.output
        assert result.output.strip().count("\n") == 0


async def test_a_password_in_the_url_is_never_logged(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    host = settings.nats_url.removeprefix("nats://")
    with_password = replace(settings, nats_url=f"nats://bob:s3cret-pw@{host}")
    worker = WorkerHandle(with_password)
    await worker.start()
    await worker.stop()
    assert "nats://***@" in caplog.text and "s3cret-pw" not in caplog.text
    assert "s3cret-pw" not in repr(with_password)


# -- commands that are not the service never create or change topology ----------------

OPERATOR_COMMANDS = [
    ("replay", "--subject", "sandbox.provision", "--dry-run"),
    ("dlq", "ls"),
    ("reconcile", "--dry-run"),
    ("ls",),
    ("status", "sbx-" + "0" * 24),
    ("destroy", "sbx-" + "0" * 24, "--tenant", "acme", "--timeout", "5"),
    ("credits", "balance", "acme"),
    ("credits", "ledger", "acme"),
    ("credits", "grant", "acme", "5", "--grant-id", "g1"),
]


@pytest.mark.parametrize("command", OPERATOR_COMMANDS, ids=lambda c: " ".join(c[:2]))
async def test_on_a_fresh_server_a_command_says_so_and_creates_nothing(
    settings: Settings, nc: Nats, command: tuple[str, ...]
) -> None:
    code, out, err = await sandboxer(settings, *command)
    assert code == 1 and "no sandboxer streams" in err and "start a worker" in err, (out, err)
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    assert [s async for s in _stream_names(nc)] == []


async def _stream_names(nc: Nats) -> AsyncIterator[str]:
    for info in await nc.jetstream().streams_info():
        yield info.config.name or "?"


async def test_no_command_changes_a_clusters_replicas(tmp_path: Path) -> None:
    with Cluster(tmp_path / "cluster") as cluster:
        await until_topology(cluster.url, replicas=3)
        for command in OPERATOR_COMMANDS:
            for replicas in ("1", "3"):
                await sandboxer(
                    Settings(nats_url=cluster.url), *command, SANDBOXER_REPLICAS=replicas
                )
        async with Client(cluster.url, reconnect=True) as client:
            replicas_of = {
                info.config.name: info.config.num_replicas
                for info in await client.js.streams_info()
            }
    assert replicas_of and {n: r for n, r in replicas_of.items() if r != 3} == {}


async def test_a_wait_that_times_out_says_so_and_the_request_still_runs(
    settings: Settings, worker: WorkerHandle
) -> None:
    command = ("provision", "--tenant", "demo", "--profile", "profile.burst-sandbox")
    code, _, err = await sandboxer(
        settings, *command, "--request-id", "slow-wait", "--wait", "--timeout", "0.001"
    )
    sandbox_id = sandbox_id_for("demo", "slow-wait")
    assert code == 1 and "no answer within 0.001 s" in err and sandbox_id in err, err
    assert "cannot reach NATS" not in err
    async with Client(settings.nats_url) as client:
        ready = await wait_for_state(client, sandbox_id, SandboxState.READY)
    assert ready.extension_id == "ext.saas-stub"


async def test_a_long_wait_shows_its_progress(settings: Settings, start_worker: Start) -> None:
    await start_worker()
    code, _, err = await sandboxer(
        settings, "provision", "--tenant", "demo", "--profile", "profile.burst-sandbox", "--wait"
    )
    assert code == 0, err
    assert " provisioning (" in err and " ready (" in err


async def test_destroying_another_tenants_sandbox_is_answered_at_once(
    settings: Settings, worker: WorkerHandle
) -> None:
    status = await provision_by_cli(settings, "acme", "profile.burst-sandbox")
    began = asyncio.get_running_loop().time()
    code, out, err = await sandboxer(settings, "destroy", status.sandbox_id, "--tenant", "t1")
    assert code == 1 and "not_found" in out, (out, err)
    assert asyncio.get_running_loop().time() - began < 10


async def test_a_grant_says_what_it_did_and_refuses_what_it_cannot(
    settings: Settings, js: JetStreamContext
) -> None:
    code, out, err = await sandboxer(
        settings, "credits", "grant", "acme", "1e3", "--grant-id", "g1"
    )
    assert code == 0 and "granted 1000 USD to acme" in out, err
    code, out, _ = await sandboxer(settings, "credits", "grant", "acme", "1000", "--grant-id", "g1")
    assert code == 0 and "already granted 1000 USD" in out
    code, _, err = await sandboxer(settings, "credits", "grant", "acme", "25", "--grant-id", "g1")
    assert code == 1 and "idempotency_conflict" in err and "1000" in err and "25" in err
    for amount, reason in (
        ("1e22", "below 10^15"),
        ("-5", "positive"),
        ("ten", "not a decimal amount"),
    ):
        code, _, err = await sandboxer(settings, "credits", "grant", "acme", amount)
        assert code == 1 and reason in err and "Traceback" not in err, (amount, err)
        assert err.strip().count("\n") == 0
    assert (await Ledger(js).balance("acme")).balance == Decimal("1000")


async def test_a_second_shell_reaches_what_dev_started(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = tmp_path / "dev.log"
    with log.open("wb") as sink:
        dev = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandboxer",
            "dev",
            "--fake-e2b",
            "--port",
            str(free_port()),
            "--state-dir",
            str(state),
            stdout=sink,
            stderr=sink,
            cwd=ROOT,
        )
    try:
        for _ in range(600):
            if "Ctrl-C" in log.read_text() or dev.returncode is not None:
                break
            await asyncio.sleep(0.05)
        said = log.read_text()
        assert f"env $(cat {state}/dev.env) .venv/bin/sandboxer route explain" in said, said
        env_file = state / "dev.env"
        assert env_file.stat().st_mode & 0o077 == 0  # the OpenBao token is this user's
        shell = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        assert shell["BAO_TOKEN"] not in said  # printed nowhere
        where = Settings(nats_url=shell.pop("SANDBOXER_NATS_URL"))

        code, out, err = await sandboxer(
            where,
            "route",
            "explain",
            "--tenant",
            "demo",
            "--profile",
            "profile.e2b-burst",
            "--json",
            **shell,
        )
        assert code == 0, err
        assert json.loads(out)["chosen"] == "ext.e2b"
        ready = await provision_by_cli(where, "demo", "profile.e2b-burst")
        assert ready.extension_id == "ext.e2b"
        assert "reconcile --dry-run --extension ext.e2b" in said
        code, out, err = await sandboxer(
            where, "reconcile", "--dry-run", "--extension", "ext.e2b", "--json", **shell
        )
        assert code == 0, err
        found = {f["sandbox_id"]: f["action"] for f in json.loads(out)}
        assert found == {ready.sandbox_id: "keep"}
        # The token in the file may read provider keys and nothing else.
        bao = hvac.Client(url=shell["BAO_ADDR"], token=shell["BAO_TOKEN"])
        with pytest.raises(hvac.exceptions.Forbidden):
            bao.secrets.kv.v2.create_or_update_secret(path="x", secret={"a": "b"})
    finally:
        dev.send_signal(signal.SIGINT)
        await asyncio.wait_for(dev.wait(), 90)


async def test_what_cannot_be_listed_or_routed_exits_non_zero(
    settings: Settings, worker: WorkerHandle
) -> None:
    # No OpenBao: E2B's sandboxes cannot be listed and its profile has no route.
    code, out, err = await sandboxer(settings, "reconcile", "--dry-run", "--extension", "ext.e2b")
    assert code == 1 and "could not list the sandboxes of ext.e2b" in err, (out, err)
    code, out, err = await sandboxer(
        settings, "route", "explain", "--tenant", "demo", "--profile", "profile.e2b-burst"
    )
    assert code == 1 and "no_route" in err and "ext.e2b" in out
    code, out, _ = await sandboxer(
        settings,
        "route",
        "explain",
        "--tenant",
        "demo",
        "--profile",
        "profile.burst-sandbox",
        "--json",
    )
    assert code == 0 and json.loads(out)["chosen"] == "ext.saas-stub"


async def test_a_wrong_command_line_is_one_line_and_no_pydantic_text(settings: Settings) -> None:
    wrong: tuple[tuple[str, ...], ...] = (
        ("provision", "--tenant", "demo"),  # a missing option
        ("dlq", "show", "abc"),  # a bad value
        ("credits", "nope"),  # no such command
        ("status", "--bogus"),  # no such option
    )
    for args in wrong:
        code, out, err = await sandboxer(settings, *args)
        assert code == 2 and out == "", (args, out, err)
        assert err.count("\n") == 1 and err.startswith("sandboxer"), (args, err)
        assert "╭" not in err and "Usage:" not in err
    invalid: tuple[tuple[str, ...], ...] = (
        ("provision", "--tenant", "demo", "--profile", "profile.x", "--ttl", "0"),
        ("destroy", "sbx-nope", "--tenant", "demo"),
        ("status", "nope"),
        ("replay", "--subject", "sandbox.provision", "--since", "yesterday"),
    )
    for args in invalid:
        code, _, err = await sandboxer(settings, *args)
        assert code == 1 and err.count("\n") == 1, (args, err)
        assert "pydantic" not in err and "http" not in err and "Traceback" not in err, err


def test_every_command_that_prints_a_result_has_json() -> None:
    # The services, and the commands that write files, print no result to parse;
    # `schemas asyncapi` prints nothing but JSON.
    exempt = {
        "worker",
        "billing",
        "export",
        "templates",
        "dev",
        "schemas export",
        "security generate",
    }
    exempt |= {"schemas asyncapi"}
    group = get_command(app)
    assert isinstance(group, TyperGroup)
    lacking = []
    for name, command in group.commands.items():
        leaves = getattr(command, "commands", {name: command})
        for leaf_name, leaf in leaves.items():
            full = name if leaf is command else f"{name} {leaf_name}"
            options = {opt for param in leaf.params for opt in param.opts}
            if full not in exempt and "--json" not in options:
                lacking.append(full)
    assert lacking == []


def test_make_run_takes_another_port() -> None:
    said = subprocess.run(
        ["make", "-n", "run", "PORT=4333"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "sandboxer dev --port 4333" in said.stdout


def test_the_readmes_configuration_defaults_are_the_codes() -> None:
    defaults = Settings()
    rows = [
        line.split("|")[1:3]
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("| `SANDBOXER_")
    ]
    checked = 0
    for names, default in rows:
        field = names.strip().split("`")[1].removeprefix("SANDBOXER_").lower()
        literal = default.strip()
        if not hasattr(defaults, field) or not (
            literal.startswith("`") and literal.count("`") == 2
        ):
            continue  # a default said in words, or not a plain setting
        value = getattr(defaults, field)
        shown = str(value) if not isinstance(value, float) else f"{value:g}"
        assert literal.strip("`") == shown, f"README says {names.strip()} defaults to {literal}"
        checked += 1
    assert checked >= 5
