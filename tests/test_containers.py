"""The Docker backend of the fixtures runs what compose.yaml runs, and says so in one
line where it cannot run."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from tests import containers
from tests.conftest import ROOT


def test_the_fixtures_images_and_flags_are_compose_yamls() -> None:
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["nats"]["image"] == containers.NATS_IMAGE
    assert services["nats"]["command"] == containers.NATS_COMMAND
    assert f"127.0.0.1:{containers.NATS_PORT}:{containers.NATS_PORT}" in services["nats"]["ports"]
    assert services["openbao"]["image"] == containers.OPENBAO_IMAGE
    assert services["openbao"]["command"] == containers.OPENBAO_COMMAND
    assert services["provisioner"]["environment"]["BAO_TOKEN"] == containers.OPENBAO_ROOT_TOKEN


def test_without_a_docker_engine_the_switch_stops_the_run_in_one_line() -> None:
    env = {
        **os.environ,
        containers.SWITCH: "containers",
        "DOCKER_HOST": "unix:///nonexistent/docker.sock",  # whatever this machine has
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_contract.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = run.stdout + run.stderr
    assert run.returncode == 4, said  # not 0 (passed), not 5 (nothing ran, silently)
    assert "no Docker engine is reachable" in said and "passed" not in said
    lines = [line for line in said.splitlines() if "Docker" in line]
    assert len(lines) == 1, said
