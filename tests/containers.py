"""The Docker path of the test fixtures: with `SANDBOXER_TEST_SERVERS=containers`, the
`nats_server` and `openbao` fixtures start the images `compose.yaml` runs, with its
flags, through testcontainers, instead of the pip-shipped servers (the default,
`packages`). Everything else about the tests stays the same.

Where no Docker engine answers (as on the machines this project is built on), the
run stops at once with one line saying so: a run that silently skipped the switch
would pass without having tested anything. `tests/test_containers.py` checks that the
images and flags below are compose.yaml's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from sandboxer.dev.servers import EmbeddedNats, EmbeddedOpenBao

SWITCH = "SANDBOXER_TEST_SERVERS"

#: What compose.yaml runs (its `image` and `command`), and the port the tests use.
NATS_IMAGE = "nats:2.12-alpine"
NATS_COMMAND = ["--jetstream", "--store_dir", "/data", "--http_port", "8222"]
NATS_PORT = 4222
OPENBAO_IMAGE = "openbao/openbao:2.4"
OPENBAO_ROOT_TOKEN = "dev-root"  # noqa: S105 - compose.yaml's dev-server placeholder
OPENBAO_COMMAND = [
    "server",
    "-dev",
    "-dev-listen-address=0.0.0.0:8200",
    f"-dev-root-token-id={OPENBAO_ROOT_TOKEN}",
]
OPENBAO_PORT = 8200


def backend() -> str:
    """`packages` (the default) or `containers`; anything else stops the run."""
    chosen = os.environ.get(SWITCH, "packages")
    if chosen not in ("packages", "containers"):
        raise pytest.UsageError(f"{SWITCH}={chosen!r}: use packages or containers")
    return chosen


def require_docker() -> None:
    """Stop the run (pytest's usage error: one line, exit code 4) unless a Docker
    engine answers."""
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:
        raise pytest.UsageError(
            f"{SWITCH}=containers, but no Docker engine is reachable "
            f"({type(exc).__name__}); unset {SWITCH} to use the pip-shipped servers"
        ) from None


class _InContainer:
    """A server of `sandboxer.dev.servers` run as a testcontainers container instead of
    a child process: the same `url`, `start`, `stop` and `frozen()` (paused)."""

    scheme: str
    port: int

    def _box(self, image: str, command: list[str], port: int, ready_log: str) -> None:
        from testcontainers.core.container import DockerContainer

        self._inner_port = port
        self._ready_log = ready_log
        self._host = "127.0.0.1"
        self.container: Any = DockerContainer(image).with_command(command)
        self.container.with_exposed_ports(port)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self._host}:{self.port}"

    def start(self, timeout_s: float = 60.0) -> None:
        from testcontainers.core.waiting_utils import wait_for_logs

        self.container.start()
        wait_for_logs(self.container, self._ready_log, timeout=timeout_s)
        self._host = self.container.get_container_host_ip()
        self.port = int(self.container.get_exposed_port(self._inner_port))

    def stop(self, timeout_s: float = 10.0) -> None:
        self.container.stop()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        wrapped = self.container.get_wrapped_container()
        wrapped.pause()
        try:
            yield
        finally:
            wrapped.unpause()


class ContainerNats(_InContainer, EmbeddedNats):
    """compose.yaml's NATS, in a container."""

    scheme = "nats"

    def __init__(self, store_dir: Path) -> None:
        super().__init__(store_dir)
        self._box(NATS_IMAGE, NATS_COMMAND, NATS_PORT, "Server is ready")


class ContainerOpenBao(_InContainer, EmbeddedOpenBao):
    """compose.yaml's OpenBao (dev mode), in a container."""

    scheme = "http"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, root_token=OPENBAO_ROOT_TOKEN, port=0)
        self._box(OPENBAO_IMAGE, OPENBAO_COMMAND, OPENBAO_PORT, "Development mode should NOT")
