"""The fake Modal control plane is faithful: the official `modal` client drives it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import modal
import pytest
from grpclib import Status
from modal.exception import AlreadyExistsError, AuthError, ResourceExhaustedError

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
