"""Logical templates: Packer runs for real (its `null` builder, no Docker engine), the
template worker registers the artifact on each provider, the catalogue records it, and
routing uses a provider only where the template is ready."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import hvac
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from adapters import packer
from sandboxer.catalogue import Catalogue
from sandboxer.client import Client
from sandboxer.connect import connection_of
from sandboxer.dev.fakes.e2b import FakeE2B
from sandboxer.dev.fakes.modal import FakeModal
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.errors import TemplateFailed
from sandboxer.settings import Settings, default_extensions_dir
from sandboxer.topology import (
    STUB_BUCKET,
    TEMPLATE_BUILD_SUBJECT,
    TEMPLATE_CONSUMER,
    TEMPLATE_STREAM,
    kv_entries,
)
from schemas import ProvisionRequest, SandboxState, TemplateBuildRequest, TemplateRecord
from tests.conftest import OPENBAO_ROOT_TOKEN, Start
from tests.helpers import sandboxer, stub_sandboxes, wait_until_drained

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_HCL = REPO / "templates" / "python-web.pkr.hcl"

#: A template for the stub alone: what `deployment` writes, with a shell step of its own.
HCL = """
variable "version" {
  type = string
}
source "null" "image" {
  communicator = "none"
}
build {
  sources = ["source.null.image"]
  provisioner "shell-local" {
    inline = [%(steps)s]
  }
  post-processors {
    post-processor "artifice" {
      files = ["digest"]
    }
    post-processor "manifest" {
      custom_data = {
        image = "registry.test/tiny:${var.version}"
      }
    }
  }
}
"""
DIGEST_STEPS = [
    "echo tiny ${var.version} > image.tar",
    """printf 'sha256:%s' "$(sha256sum image.tar | cut -c1-64)" > digest""",
]


@pytest.fixture(autouse=True)
def needs_packer() -> None:
    if shutil.which("packer") is None:
        pytest.skip("packer is not installed (`make check` installs Debian's packer package)")


def hcl(*steps: str) -> str:
    return HCL % {"steps": ", ".join(json.dumps(step) for step in steps)}


def deployment(
    tmp_path: Path,
    *,
    steps: list[str] | None = None,
    providers: tuple[str, ...] = ("ext.saas-stub",),
) -> Path:
    """The shipped extensions plus template `tiny` (version 1) on `providers`, and
    `profile.tiny` routed over them."""
    extensions = tmp_path / "extensions"
    shutil.copytree(default_extensions_dir(), extensions)
    (tmp_path / "tiny.pkr.hcl").write_text(hcl(*(steps or DIGEST_STEPS)))
    template = {
        "kind": "template",
        "id": "template.tiny",
        "version": "1",
        "packer": "../tiny.pkr.hcl",
        "resources": {"cpu": 1, "memory_mb": 256},
        "providers": list(providers),
    }
    (extensions / "template.tiny.yaml").write_text(json.dumps(template))
    profile = {
        "kind": "profile",
        "id": "profile.tiny",
        "pricing_model": "metered",
        "routes": list(providers),
        "template": "tiny@1",
        "ttl": {"default_s": 60, "min_s": 5, "max_s": 600},
        "resources": {"cpu": 1, "memory_mb": 256},
    }
    (extensions / "profile.tiny.yaml").write_text(json.dumps(profile))
    return extensions


async def build(js: JetStreamContext, name: str = "tiny", request_id: str | None = None) -> str:
    request_id = request_id or f"b-{uuid.uuid4().hex[:8]}"
    request = TemplateBuildRequest(request_id=request_id, name=name)
    await js.publish(TEMPLATE_BUILD_SUBJECT, request.model_dump_json().encode())
    return request_id


async def settled(
    js: JetStreamContext, name: str = "tiny", version: str = "1", timeout_s: float = 60
) -> TemplateRecord:
    """The record once it is ready or failed."""
    catalogue = Catalogue(js)
    async with asyncio.timeout(timeout_s):
        while True:
            found = await catalogue.get(name, version)
            if found and found[0].state in ("ready", "failed"):
                return found[0]
            await asyncio.sleep(0.1)


async def stub_templates(js: JetStreamContext) -> list[str]:
    """The images the stub cloud has registered (none if it was never used)."""
    try:
        return [key async for key, _ in kv_entries(js, STUB_BUCKET, "template.>")]
    except NotFoundError:
        return []


# -- Packer ---------------------------------------------------------------------------


async def pack(
    hcl_file: Path, workdir: Path, version: str = "1", said: list[str] | None = None
) -> packer.Artifact:
    """`packer.build` as a template worker started now runs it."""
    settings = Settings.from_env()

    async def progress(line: str) -> None:
        if said is not None:
            said.append(line)

    return await packer.build(
        hcl_file,
        {"version": version},
        workdir,
        progress,
        timeout_s=60,
        binary=settings.packer,
        env=settings.packer_env,
    )


async def test_packer_builds_the_example_and_its_digest_is_reproducible(tmp_path: Path) -> None:
    said: list[str] = []
    runs = []
    for i in range(2):
        workdir = tmp_path / f"run{i}"
        workdir.mkdir()
        runs.append(await pack(EXAMPLE_HCL, workdir, "1.0.0", said))
    first, second = runs
    assert first.digest.startswith("sha256:") and len(first.digest) == 71
    assert first.image == f"registry.local/sandboxer/python-web:1.0.0@{first.digest}"
    assert second == first  # the same HCL and version: the same bytes
    assert first.packer_version.count(".") == 2
    assert any("shell" in line for line in said)  # Packer's own progress came through


async def test_a_failing_packer_build_says_why(tmp_path: Path) -> None:
    (tmp_path / "bad.pkr.hcl").write_text(hcl("echo disk full >&2", "exit 3"))
    with pytest.raises(
        TemplateFailed, match=r"failed \(exit 1\): ==> null.image: disk full; .*exit status: 3"
    ):
        await pack(tmp_path / "bad.pkr.hcl", tmp_path)


async def test_a_build_without_a_digest_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nodigest.pkr.hcl").write_text(hcl("echo none > digest"))
    with pytest.raises(TemplateFailed, match="no sha256 digest"):
        await pack(tmp_path / "nodigest.pkr.hcl", tmp_path)


async def test_packer_missing_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXER_PACKER", str(tmp_path / "no-packer-here"))
    with pytest.raises(TemplateFailed, match=r"packer not found on PATH.*apt-get install packer"):
        await pack(EXAMPLE_HCL, tmp_path, "1.0.0")


async def test_packer_gets_no_secret_of_the_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BAO_TOKEN", "s.secret-bao-token")
    monkeypatch.setenv("SANDBOXER_NATS_PASSWORD", "nats-secret")
    monkeypatch.setenv("PKR_VAR_registry", "registry.test")
    (tmp_path / "env.pkr.hcl").write_text(hcl("env > seen.env", *DIGEST_STEPS))
    await pack(tmp_path / "env.pkr.hcl", tmp_path)
    seen = (tmp_path / "seen.env").read_text()
    assert "PATH=" in seen and "CHECKPOINT_DISABLE=1" in seen
    assert "PKR_VAR_registry=registry.test" in seen
    assert "s.secret-bao-token" not in seen and "nats-secret" not in seen
    assert "BAO_" not in seen and "SANDBOXER_" not in seen


# -- the template worker and routing --------------------------------------------------


async def test_built_template_routes_and_provisions_with_the_providers_id(
    tmp_path: Path,
    settings: Settings,
    js: JetStreamContext,
    start_templates: Start,
    start_worker: Start,
) -> None:
    extensions = deployment(tmp_path)
    await start_worker(extensions_dir=extensions)
    async with Client(settings.nats_url) as client:
        before = await client.provision(
            ProvisionRequest(request_id="early", tenant="acme", profile="profile.tiny"), wait_s=30
        )
        assert before is not None and before.state is SandboxState.FAILED
        assert before.error is not None and before.error.code == "no_route"
        assert "template_not_ready: tiny@1 was never built" in before.error.message

        await start_templates(extensions_dir=extensions, template_poll_s=0.1)
        request_id = await build(js)
        record = await settled(js)
        assert record.state == "ready" and record.request_ids == [request_id]
        assert record.image == f"registry.test/tiny:1@{record.digest}"
        stub = record.providers["ext.saas-stub"]
        assert (
            stub.state == "ready"
            and stub.template_id
            and stub.template_id.startswith("stub-tiny-1-")
        )

        status = await client.provision(
            ProvisionRequest(request_id="after", tenant="acme", profile="profile.tiny"), wait_s=30
        )
    assert status is not None and status.state is SandboxState.READY
    assert status.template_id == stub.template_id
    made = [
        s
        for s in await stub_sandboxes(js)
        if s["tags"]["sandboxer_sandbox_id"] == status.sandbox_id
    ]
    assert [s["template"] for s in made] == [stub.template_id]  # the provider got its own id


async def test_a_replayed_build_registers_nothing_twice_and_packer_runs_once(
    tmp_path: Path, settings: Settings, js: JetStreamContext, start_templates: Start
) -> None:
    runs = tmp_path / "runs"
    steps = [f"echo run >> {runs}", *DIGEST_STEPS]
    extensions = deployment(tmp_path, steps=steps)
    await start_templates(extensions_dir=extensions, template_poll_s=0.1)
    first = await build(js, request_id="once")
    record = await settled(js)
    for request_id in ("once", "once", "again"):  # a replay, a redelivery, a new request
        await build(js, request_id=request_id)
    await wait_until_drained(js, TEMPLATE_CONSUMER, stream=TEMPLATE_STREAM)
    again = await settled(js)
    assert runs.read_text().count("run") == 1  # Packer ran for the first request only
    assert again.digest == record.digest and again.state == "ready"
    assert again.providers == record.providers  # no registration was made again
    assert again.request_ids == [first, "again"]
    assert len(await stub_templates(js)) == 1


async def test_a_failed_packer_build_is_recorded_and_told(
    tmp_path: Path, settings: Settings, js: JetStreamContext, start_templates: Start
) -> None:
    extensions = deployment(tmp_path, steps=["exit 7"])
    await start_templates(extensions_dir=extensions, template_poll_s=0.1)
    events: list[dict[str, Any]] = []
    sub = await connection_of(js).subscribe("template.status.tiny", cb=partial(_append, events))
    await build(js)
    record = await settled(js)
    await sub.unsubscribe()
    assert record.state == "failed" and record.digest is None
    assert record.error is not None and record.error.code == "template_failed"
    assert "exit status: 7" in record.error.message
    assert events[-1]["step"] == "done" and "template_failed" in events[-1]["message"]
    assert await stub_templates(js) == []


async def _append(events: list[dict[str, Any]], message: Any) -> None:
    events.append(json.loads(message.data))


async def test_a_build_of_an_unknown_template_or_version_is_refused(
    settings: Settings, js: JetStreamContext, start_templates: Start
) -> None:
    await start_templates(template_poll_s=0.1)
    code, out, err = await sandboxer(settings, "template", "build", "nope")
    assert code == 1 and "no template 'nope'" in err
    code, out, err = await sandboxer(
        settings, "template", "build", "python-web@0.9", "--timeout", "30"
    )
    assert code == 1 and "builds version 1.0.0, not 0.9" in out
    await js.publish(TEMPLATE_BUILD_SUBJECT, b'{"request_id": "x", "name": "Bad Name"}')
    await wait_until_drained(
        js, TEMPLATE_CONSUMER, stream=TEMPLATE_STREAM
    )  # refused, never redelivered


async def test_a_worker_killed_mid_build_leaves_no_packer_and_the_next_one_finishes(
    tmp_path: Path,
    settings: Settings,
    js: JetStreamContext,
    start_templates: Start,
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
) -> None:
    marker = tmp_path / "started"
    nap = f"sleep {600 + uuid.uuid4().int % 1000}"  # a command line of its own, to look for
    steps = [f"touch {marker}", nap, *DIGEST_STEPS]
    extensions = deployment(tmp_path, steps=steps)
    first = spawn_worker(
        "templates", SANDBOXER_EXTENSIONS_DIR=str(extensions), SANDBOXER_TEMPLATE_POLL_S="0.1"
    )
    await build(js, request_id="killed")
    async with asyncio.timeout(30):
        while not marker.exists():
            await asyncio.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    await asyncio.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", nap], capture_output=True, text=True).stdout
    assert left == ""  # Packer and its shell died with the worker
    found = await Catalogue(js).get("tiny", "1")
    assert found is not None and found[0].state == "packing"

    (tmp_path / "tiny.pkr.hcl").write_text(hcl(*DIGEST_STEPS))  # the next build is quick
    await start_templates(extensions_dir=extensions, template_poll_s=0.1)
    record = await settled(js)  # the redelivery after the ack wait resumes it
    assert record.state == "ready" and record.request_ids == ["killed"]
    assert len(await stub_templates(js)) == 1


async def test_template_cli_lists_and_shows_the_catalogue(
    tmp_path: Path, settings: Settings, js: JetStreamContext, start_templates: Start
) -> None:
    extensions = deployment(tmp_path)
    await start_templates(extensions_dir=extensions, template_poll_s=0.1)
    env = {"SANDBOXER_EXTENSIONS_DIR": str(extensions)}
    code, out, err = await sandboxer(settings, "template", "build", "tiny", **env)
    assert code == 0, err
    assert "packer: " in err and "register: ext.saas-stub: ready" in err  # progress shown
    assert out.startswith("tiny@1") and "ready" in out
    code, out, _ = await sandboxer(settings, "template", "ls", "--json", **env)
    [listed] = json.loads(out)
    assert listed["name"] == "tiny" and listed["providers"]["ext.saas-stub"]["state"] == "ready"
    code, out, _ = await sandboxer(settings, "template", "show", "tiny@1", **env)
    assert code == 0 and "ext.saas-stub" in out and "stub-tiny-1-" in out
    code, _, err = await sandboxer(settings, "template", "show", "python-web", **env)
    assert code == 1 and "python-web@1.0.0 was never built" in err


# -- on the fake E2B and the fake Modal -----------------------------------------------


@dataclass
class Clouds:
    e2b: FakeE2B
    modal: FakeModal


@pytest.fixture
def clouds(openbao: EmbeddedOpenBao, monkeypatch: pytest.MonkeyPatch) -> Iterator[Clouds]:
    """The fake E2B and the fake Modal, with their platform keys in OpenBao."""
    admin = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)
    api_key = f"e2b_{uuid.uuid4().hex}"
    paths = {"e2b": {"api_key": api_key}}
    with FakeE2B(api_keys={api_key}, build_polls=2) as e2b, FakeModal() as modal:
        modal.state.token_id, modal.state.token_secret = "ak-" + uuid.uuid4().hex, "as-secret"
        paths["modal"] = {"token_id": modal.state.token_id, "token_secret": "as-secret"}
        for name, secret in paths.items():
            admin.secrets.kv.v2.create_or_update_secret(
                path=f"sandboxer/platform/{name}", secret=secret, mount_point="secret"
            )
        monkeypatch.setenv("SANDBOXER_E2B_API_URL", e2b.url)
        monkeypatch.setenv("MODAL_SERVER_URL", modal.url)
        monkeypatch.setenv("BAO_ADDR", openbao.url)
        monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
        monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
        yield Clouds(e2b, modal)
    for name in paths:  # leave no key to other tests
        admin.secrets.kv.v2.delete_metadata_and_all_versions(
            path=f"sandboxer/platform/{name}", mount_point="secret"
        )


async def test_the_example_is_built_once_ready_on_every_provider_and_provisions_on_e2b(
    clouds: Clouds,
    settings: Settings,
    js: JetStreamContext,
    start_templates: Start,
    start_worker: Start,
) -> None:
    await start_templates(template_poll_s=0.1)
    await start_worker()
    await build(js, "python-web")
    record = await settled(js, "python-web", "1.0.0")
    assert record.state == "ready", record
    assert sorted(record.providers) == ["ext.e2b", "ext.modal", "ext.saas-stub"]
    assert {p.state for p in record.providers.values()} == {"ready"}
    e2b_id = record.ready_on("ext.e2b")
    modal_id = record.ready_on("ext.modal")
    assert e2b_id in clouds.e2b.registered and modal_id and modal_id.startswith("im-")
    [e2b_build] = clouds.e2b.builds  # one build on each provider, from the pinned image
    assert e2b_build.from_image == record.image and e2b_build.cpu_count == 2
    assert [i.image_id for i in clouds.modal.state.builds_of(record.image or "")] == [modal_id]

    async with Client(settings.nats_url) as client:
        status = await client.provision(
            ProvisionRequest(request_id="py-1", tenant="acme", profile="profile.python-web"),
            wait_s=60,
        )
    assert status is not None and status.state is SandboxState.READY, status
    assert status.extension_id == "ext.e2b" and status.template_id == e2b_id
    assert status.provider_sandbox_id is not None
    assert clouds.e2b.sandboxes[status.provider_sandbox_id].template_id == e2b_id


async def test_a_provider_failing_the_build_is_failed_alone_and_routing_skips_it(
    tmp_path: Path,
    clouds: Clouds,
    settings: Settings,
    js: JetStreamContext,
    start_templates: Start,
    start_worker: Start,
) -> None:
    providers = ("ext.e2b", "ext.modal", "ext.saas-stub")
    extensions = deployment(tmp_path, providers=providers)
    digest = "sha256:" + hashlib.sha256(b"tiny 1\n").hexdigest()  # what DIGEST_STEPS make
    image = f"registry.test/tiny:1@{digest}"
    clouds.e2b.failing_images[image] = "failed to pull registry.test/tiny: manifest unknown"
    await start_templates(extensions_dir=extensions, template_poll_s=0.1)
    await start_worker(extensions_dir=extensions)
    await build(js)
    record = await settled(js)
    assert record.state == "failed" and record.image == image
    e2b = record.providers["ext.e2b"]
    assert e2b.state == "failed" and e2b.reason and "manifest unknown" in e2b.reason
    assert record.providers["ext.modal"].state == "ready"
    assert record.providers["ext.saas-stub"].state == "ready"

    env = {"SANDBOXER_EXTENSIONS_DIR": str(extensions)}
    code, out, _ = await sandboxer(
        settings, "route", "explain", "--tenant", "acme", "--profile", "profile.tiny", **env
    )
    assert code == 0
    assert "template_not_ready: tiny@1 failed on ext.e2b: failed to pull" in out
    modal_id = record.ready_on("ext.modal")
    assert f"CHOSEN (platform key secret/sandboxer/platform/modal v1, template {modal_id})" in out
    async with Client(settings.nats_url) as client:
        status = await client.provision(
            ProvisionRequest(request_id="tiny-1", tenant="acme", profile="profile.tiny"),
            wait_s=60,
        )
    assert status is not None and status.state is SandboxState.READY, status
    assert status.extension_id == "ext.modal"
    assert status.template_id == record.ready_on("ext.modal")

    # The runbook: fix the cause, build again. Packer does not run, Modal is not asked.
    del clouds.e2b.failing_images[image]
    await build(js)
    async with asyncio.timeout(60):
        while (again := await settled(js)).state != "ready":
            await asyncio.sleep(0.1)
    assert again.providers["ext.modal"] == record.providers["ext.modal"]
    assert len(clouds.modal.state.builds_of(image)) == 1 and len(clouds.e2b.builds) == 2
