"""Real servers for real tests: every test gets its own nats-server with JetStream, on a
free loopback port, in a temporary folder, stopped by PID afterwards. With
`SANDBOXER_TEST_SERVERS=containers`, the NATS and OpenBao of compose.yaml's images
instead, started by testcontainers (tests/containers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from consumers.billing import run_billing
from consumers.templates import run_template_worker
from consumers.worker import run_worker
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.dev.servers import EmbeddedNats, EmbeddedOpenBao
from sandboxer.settings import Settings
from sandboxer.topology import ensure_topology
from tests import containers
from tests.helpers import as_started

#: The trust boundary's fixtures (`secure_bus`, `services`), for every test module.
pytest_plugins = ("tests.secure",)

ROOT = Path(__file__).resolve().parent.parent

# Modal's client reads its config file when first imported (by a test or an adapter),
# and would send 127.0.0.1 through an HTTP proxy if one were set: keep tests from both.
os.environ["MODAL_CONFIG_PATH"] = str(ROOT / "tests" / "no-modal.toml")  # never created
os.environ["MODAL_DISABLE_API_PROXY"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    if containers.backend() == "containers":
        containers.require_docker()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    store = tmp_path / "nats"
    boxed = containers.backend() == "containers"
    server = containers.ContainerNats(store) if boxed else EmbeddedNats(store)
    with server:
        yield server


@pytest.fixture
def settings(nats_server: EmbeddedNats) -> Settings:
    """Fast timings for tests: short ack wait and backoff."""
    return Settings(
        nats_url=nats_server.url,
        deployment="test",
        ack_wait_s=2.0,
        max_deliver=3,
        retry_backoff_s=0.1,
        retry_cap_s=0.5,
        reconcile_every_s=0,  # tests reconcile when they mean to
    )


#: Tenants the tests provision for, granted plenty of credits by `funded`.
FUNDED_TENANTS = ("acme", "t1", "demo")
FUNDS = Decimal("1000")


@pytest.fixture
async def funded(js: JetStreamContext) -> tuple[str, ...]:
    ledger = Ledger(js)
    for tenant in FUNDED_TENANTS:
        await ledger.grant(tenant, FUNDS, "test-funds")
    return FUNDED_TENANTS


@pytest.fixture
async def fresh_tenant(js: JetStreamContext) -> str:
    """A tenant of its own (no key another test left in OpenBao), with 100 USD."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    await Ledger(js).grant(name, Decimal("100"), "test-funds")
    return name


@pytest.fixture
async def observer(settings: Settings) -> AsyncIterator[Client]:
    """A client without a worker: for tests that start their workers themselves."""
    async with Client(settings.nats_url) as c:
        yield c


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Nats]:
    conn = await nats.connect(nats_server.url)
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc: Nats) -> JetStreamContext:
    context = nc.jetstream()
    await ensure_topology(context)
    return context


Service = Callable[[Settings, asyncio.Event, asyncio.Event], Coroutine[Any, Any, None]]


class Start(Protocol):
    """Start an in-process service; keyword arguments change its settings."""

    async def __call__(self, **changes: Any) -> WorkerHandle: ...


class WorkerHandle:
    """An in-process service (a worker, by default) that a test can start and stop."""

    def __init__(self, settings: Settings, run: Service = run_worker) -> None:
        self.settings = settings
        self._run = run
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self._task = asyncio.create_task(self._run(self.settings, self._stop, ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait({self._task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # raises what made the worker stop
        if not ready.is_set():
            raise TimeoutError("worker did not start")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait_for(self._task, 30)

    @property
    def crashed(self) -> bool:
        """True if the service ended before it was asked to (or with an error)."""
        if self._task is None or not self._task.done():
            return False
        return not self._stop.is_set() or self._task.exception() is not None


async def _starter(settings: Settings, run: Service) -> AsyncIterator[Start]:
    """Start in-process services; keyword arguments change their settings. All are
    stopped when the test ends."""
    handles: list[WorkerHandle] = []

    async def start(**changes: Any) -> WorkerHandle:
        handle = WorkerHandle(replace(as_started(settings), **changes), run)
        await handle.start()
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        await handle.stop()


@pytest.fixture
async def start_worker(settings: Settings, funded: tuple[str, ...]) -> AsyncIterator[Start]:
    async for start in _starter(settings, run_worker):
        yield start


@pytest.fixture
async def start_billing(settings: Settings) -> AsyncIterator[Start]:
    async for start in _starter(settings, run_billing):
        yield start


@pytest.fixture
async def start_templates(settings: Settings) -> AsyncIterator[Start]:
    async for start in _starter(settings, run_template_worker):
        yield start


@pytest.fixture
async def worker(start_worker: Start) -> WorkerHandle:
    return await start_worker()


@pytest.fixture
async def client(settings: Settings, worker: WorkerHandle) -> AsyncIterator[Client]:
    async with Client(settings.nats_url) as c:
        yield c


@pytest.fixture
def spawn_worker(
    settings: Settings, tmp_path: Path, funded: tuple[str, ...]
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `sandboxer worker` as a child process (for kill tests)."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*command: str, **env: str) -> subprocess.Popen[bytes]:
        environment = {
            **os.environ,
            "SANDBOXER_NATS_URL": settings.nats_url,
            "SANDBOXER_DEPLOYMENT": settings.deployment,
            "SANDBOXER_ACK_WAIT_S": str(settings.ack_wait_s),
            "SANDBOXER_MAX_DELIVER": str(settings.max_deliver),
            "SANDBOXER_RETRY_BACKOFF_S": str(settings.retry_backoff_s),
            "SANDBOXER_RETRY_CAP_S": str(settings.retry_cap_s),
            "SANDBOXER_RECONCILE_EVERY_S": str(settings.reconcile_every_s),
            **env,
        }
        log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer", *(command or ("worker",))],
            env=environment,
            stdout=log,
            stderr=log,
        )
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.fixture
def spawn_billing(
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
) -> Callable[..., subprocess.Popen[bytes]]:
    """Start `sandboxer billing` as a child process."""

    def spawn(**env: str) -> subprocess.Popen[bytes]:
        return spawn_worker("billing", **env)

    return spawn


OPENBAO_ROOT_TOKEN = containers.OPENBAO_ROOT_TOKEN


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedOpenBao]:
    """One `bao server -dev` for the session, on a free loopback port, stopped by PID.
    Tests keep apart by using their own tenants and paths."""
    workdir = tmp_path_factory.mktemp("openbao")
    if containers.backend() == "containers":
        bao: EmbeddedOpenBao = containers.ContainerOpenBao(workdir)
    else:
        bao = EmbeddedOpenBao(workdir, root_token=OPENBAO_ROOT_TOKEN)
    with bao:
        yield bao


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the chaos figures as a table, when the chaos tests ran."""
    from tests.helpers import FIGURES

    if not FIGURES:
        return
    scale = "full" if os.environ.get("SANDBOXER_CHAOS") == "full" else "smoke"
    terminalreporter.section(f"chaos figures ({scale}; every figure must be 0)")
    for name, value, detail in FIGURES:
        terminalreporter.write_line(f"{name:<52} {value:>5}   {detail}")
