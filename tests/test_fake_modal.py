"""The fake Modal control plane is faithful: the official `modal` client drives it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import modal
import pytest
from grpclib import Status
from modal.exception import (
    AlreadyExistsError,
    AuthError,
    ImageBuildError,
    NotFoundError,
    ResourceExhaustedError,
)

from sandboxer.dev.fakes.modal import FakeModal


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModal]:
    with FakeModal() as server:
        monkeypatch.setenv("MODAL_SERVER_URL", server.url)
        yield server


@pytest.fixture
async def client(fake: FakeModal) -> AsyncIterator[modal.Client]:
    c = await modal.Client.from_credentials.aio(fake.state.token_id, fake.state.token_secret)
    yield c
    await c.close.aio()


async def test_client_creates_lists_and_terminates(fake: FakeModal, client: modal.Client) -> None:
    app = await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=client)
    image = modal.Image.from_id("im-" + "a" * 22, client=client)
    gpu = await modal.Sandbox.create.aio(
        app=app,
        image=image,
        gpu="H100",
        cpu=4.0,
        memory=16384,
        timeout=600,
        tags={"team": "a", "kind": "gpu"},
        client=client,
    )
    cpu = await modal.Sandbox.create.aio(
        app=app,
        image=modal.Image.from_registry("python:3.12"),
        cpu=2.0,
        memory=2048,
        tags={"team": "a"},
        client=client,
    )
    made = fake.state.sandboxes[gpu.object_id]
    assert made.version == 1 and len(gpu.object_id) == 25  # V1 (GPU): sb- + 22
    assert made.gpu == ("H100", 1) and made.definition.resources.milli_cpu == 4000
    assert fake.state.sandboxes[cpu.object_id].version == 2  # CPU only: V2
    assert await gpu.poll.aio() is None and await cpu.poll.aio() is None  # running

    listed = [
        s.object_id
        async for s in modal.Sandbox.list.aio(app_id=app.app_id, tags={"team": "a"}, client=client)
    ]
    assert sorted(listed) == sorted([gpu.object_id, cpu.object_id])
    again = await modal.Sandbox.from_id.aio(gpu.object_id, client=client)
    assert await again.get_tags.aio() == {"team": "a", "kind": "gpu"}

    await gpu.terminate.aio()
    await gpu.terminate.aio()  # finished already: a no-op
    assert await gpu.poll.aio() == 137
    assert [s.sandbox_id for s in fake.state.alive()] == [cpu.object_id]


async def test_client_sees_names_quota_and_bad_tokens(
    fake: FakeModal, client: modal.Client
) -> None:
    app = await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=client)
    image = modal.Image.from_id("im-" + "b" * 22, client=client)
    await modal.Sandbox.create.aio(app=app, image=image, name="sbx-1", client=client)
    with pytest.raises(AlreadyExistsError):  # a name is unique among running sandboxes
        await modal.Sandbox.create.aio(app=app, image=image, name="sbx-1", client=client)
    fake.state.fail("SandboxCreateV2", Status.RESOURCE_EXHAUSTED, "GPU quota reached")
    with pytest.raises(ResourceExhaustedError):
        await modal.Sandbox.create.aio(app=app, image=image, client=client)
    wrong = await modal.Client.from_credentials.aio("ak-wrong", "as-wrong")
    with pytest.raises(AuthError):
        await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=wrong)
    await wrong.close.aio()
    assert len(fake.state.sandboxes) == 1


@pytest.mark.parametrize("gpu", [None, "T4"], ids=["v2-cpu", "v1-gpu"])
async def test_client_reaches_ports_through_tunnels_and_connect_tokens(
    fake: FakeModal, client: modal.Client, gpu: str | None
) -> None:
    """`tunnels()` from another handle (`from_id`) leads to the sandbox's own server;
    a connect token opens a port through the proxy, and nothing else does."""
    import httpx

    app = await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=client)
    made = await modal.Sandbox.create.aio(
        app=app,
        image=modal.Image.from_registry("python:3.12"),
        gpu=gpu,
        encrypted_ports=[3000],
        unencrypted_ports=[22],
        client=client,
    )
    handle = await modal.Sandbox.from_id.aio(made.object_id, client=client)
    tunnels = await handle.tunnels.aio(timeout=5)
    assert sorted(tunnels) == [22, 3000]
    assert tunnels[22].tcp_socket == ("127.0.0.1", tunnels[22].unencrypted_port)
    credentials = await handle.create_connect_token.aio(user_metadata={"who": "acme"}, port=8080)
    async with httpx.AsyncClient() as http:
        page = (await http.get(f"http://127.0.0.1:{tunnels[3000].port}/x")).json()
        assert page == {"served_by": made.object_id, "port": "3000", "path": "/x"}
        refused = await http.get(credentials.url)
        bearer = {"Authorization": f"Bearer {credentials.token}"}
        opened = (await http.get(credentials.url, headers=bearer)).json()
        by_query = await http.get(
            credentials.url, params={"_modal_connect_token": credentials.token}
        )
    assert refused.status_code == 401 and by_query.status_code == 200
    assert opened["served_by"] == made.object_id and opened["port"] == "8080"
    assert opened["verified_user_data"] == '{"who": "acme"}'
    await made.terminate.aio()
    async with httpx.AsyncClient() as http:
        assert (await http.get(credentials.url, headers=bearer)).status_code == 401


async def test_client_builds_a_registry_image_once_and_streams_its_log(
    fake: FakeModal, client: modal.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """`Image.from_registry(...).build()`: ImageGetOrCreate, then ImageJoinStreaming in
    several rounds, each resumed from `last_entry_id` (every line printed once); the
    same definition again, even twice at once, is the same image and no new build."""
    fake.state.join_round_s = 0.05  # rounds end before the 0.2 s build does
    app = await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=client)
    image = modal.Image.from_registry("ghcr.io/acme/tool:1.0")
    with modal.enable_output():
        await image.build.aio(app)
    printed = capsys.readouterr().out
    [build] = fake.state.builds_of("ghcr.io/acme/tool:1.0")
    assert image.object_id == build.image_id and len(image.object_id) == 25  # im- + 22
    assert list(build.definition.dockerfile_commands) == ["FROM ghcr.io/acme/tool:1.0"]
    assert fake.state.calls["ImageJoinStreaming"] >= 2
    lines = [line.data.strip() for line in build.logs]
    assert lines[-1] == f"Finished image build for {image.object_id}"
    # Every line once, none twice across rounds; the client may not have rendered the
    # last one yet when build() returns on a loaded machine.
    assert all(printed.count(line) == 1 for line in lines[:-1]), printed
    assert printed.count(lines[-1]) <= 1, printed

    joins = fake.state.calls["ImageJoinStreaming"]
    again = modal.Image.from_registry("ghcr.io/acme/tool:1.0")
    await again.build.aio(app)
    assert again.object_id == image.object_id  # built already: no join, no build
    assert fake.state.calls["ImageJoinStreaming"] == joins
    first, second = (
        modal.Image.from_registry("ghcr.io/acme/x:2"),
        modal.Image.from_registry("ghcr.io/acme/x:2"),
    )
    await asyncio.gather(first.build.aio(app), second.build.aio(app))
    assert first.object_id == second.object_id  # the second joined the first's build
    assert len(fake.state.builds_of("ghcr.io/acme/x:2")) == 1 and len(fake.state.images) == 2

    loaded = modal.Image.from_id(image.object_id, client=client)
    fetched = [entry.message async for entry in loaded.logs.fetch.aio(layers=None)]
    assert fetched == [line.data for line in build.logs]
    sandbox = await modal.Sandbox.create.aio(app=app, image=loaded, client=client)
    assert fake.state.sandboxes[sandbox.object_id].definition.image_id == image.object_id


async def test_client_sees_a_failed_pull_in_the_build_log(
    fake: FakeModal, client: modal.Client
) -> None:
    """A reference that cannot be pulled: ImageBuildError with Modal's message (the
    result has no exception text; the log has the cause), an image nothing can use,
    and a new build when asked again (Modal keeps no failed build)."""
    app = await modal.App.lookup.aio("sandboxer", create_if_missing=True, client=client)
    image = modal.Image.from_registry("ghcr.io/acme/fail:1")
    with pytest.raises(ImageBuildError) as raised:
        await image.build.aio(app)
    failed = raised.value.image_id
    assert str(raised.value) == (
        f"Image build for {failed} failed.\nView the build logs:\n  modal image logs {failed}"
    )
    fetched = [entry.message async for entry in image.logs.fetch.aio(layers=None)]
    assert "Error: reading manifest of ghcr.io/acme/fail:1: manifest unknown\n" in fetched
    with pytest.raises(NotFoundError):
        await modal.Sandbox.create.aio(
            app=app, image=modal.Image.from_id(failed, client=client), client=client
        )
    with pytest.raises(ImageBuildError) as again:
        await modal.Image.from_registry("ghcr.io/acme/fail:1").build.aio(app)
    assert again.value.image_id != failed
    assert len(fake.state.builds_of("ghcr.io/acme/fail:1")) == 2 and fake.state.sandboxes == {}
