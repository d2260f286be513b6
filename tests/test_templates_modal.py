"""ext.modal registers templates against the fake Modal gRPC server, through the official
`modal` client inside the adapter: a template is a Modal image built from the registry
reference and kept by its `im-` id, built once however often it is registered, and a
failed build ends `failed` with Modal's reason."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import timedelta

import pytest

from adapters.base import AdapterContext, Credentials, SandboxSpec, TemplateImage
from adapters.modal import ModalAdapter
from adapters.registry import Registry
from sandboxer.dev.fakes.modal import FakeModal
from sandboxer.errors import ProviderRejected
from sandboxer.settings import Settings
from schemas import utcnow

IMAGE = TemplateImage(
    name="tool",
    version="1.0",
    image="ghcr.io/acme/tool:1.0",
    digest="sha256:" + "ab" * 32,
    cpu=2,
    memory_mb=2048,
    start_cmd="python -m http.server 8080",
    ready_cmd="curl -sf localhost:8080",
)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModal]:
    with FakeModal() as server:
        monkeypatch.setenv("MODAL_SERVER_URL", server.url)
        yield server


@pytest.fixture
def credentials(fake: FakeModal) -> Credentials:
    return Credentials(
        "platform", {"token_id": fake.state.token_id, "token_secret": fake.state.token_secret}
    )


@pytest.fixture
def registry() -> Registry:
    return Registry.load(Settings(deployment="test").extensions_dir)


def new_adapter(registry: Registry) -> ModalAdapter:
    """An adapter as a (re)started worker builds it: knowing nothing yet."""
    context = AdapterContext(registry.extensions["ext.modal"], Settings(deployment="test"))
    return ModalAdapter(context)


@pytest.fixture
async def adapter(registry: Registry) -> AsyncIterator[ModalAdapter]:
    made = new_adapter(registry)
    yield made
    await made.aclose()


def spec(registry: Registry, template: str) -> SandboxSpec:
    return SandboxSpec(
        sandbox_id="sbx-templated",
        tenant="acme",
        deployment="test",
        profile=registry.profile("profile.burst-sandbox"),
        ttl_s=600,
        expires_at=utcnow() + timedelta(seconds=600),
        template=template,
    )


async def test_registered_image_is_ready_and_sandboxes_are_made_from_its_id(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials, registry: Registry
) -> None:
    ref = await adapter.register_template(IMAGE, credentials)
    [build] = fake.state.builds_of("ghcr.io/acme/tool:1.0")
    assert ref.template_id == build.image_id and ref.template_id.startswith("im-")
    assert list(build.definition.dockerfile_commands) == [
        "FROM ghcr.io/acme/tool:1.0",
        f'LABEL sandboxer.template="{IMAGE.alias}"',
        'CMD ["sh", "-c", "python -m http.server 8080"]',
    ]

    progress = await adapter.template_progress(ref, credentials)
    assert (progress.state, progress.reason) == ("ready", None)
    assert "=> Step 0: FROM ghcr.io/acme/tool:1.0" in progress.logs
    assert progress.logs[-1] == f"Finished image build for {ref.template_id}"
    again = await adapter.template_progress(ref, credentials)
    assert again.state == "ready" and again.logs == ()  # no line twice

    made = await adapter.provision(spec(registry, ref.template_id), credentials)
    assert fake.state.sandboxes[made.provider_sandbox_id].definition.image_id == ref.template_id
    assert fake.state.calls["ImageGetOrCreate"] == 1  # the create loaded it by id
    await adapter.teardown(made.provider_sandbox_id, credentials)


async def test_registering_the_same_image_again_builds_nothing_new(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials, registry: Registry
) -> None:
    first = await adapter.register_template(IMAGE, credentials)
    assert await adapter.register_template(IMAGE, credentials) == first
    restarted = new_adapter(registry)
    assert await restarted.register_template(IMAGE, credentials) == first
    assert [b.image_id for b in fake.state.builds_of(IMAGE.image)] == [first.template_id]
    assert fake.state.calls["ImageJoinStreaming"] == 1  # only the first build was joined

    # A worker that restarts between registering and polling asks Modal.
    afresh = new_adapter(registry)
    assert (await afresh.template_progress(first, credentials)).state == "ready"
    assert fake.state.calls["ImageFromId"] == 1
    for made in (restarted, afresh):
        await made.aclose()


async def test_the_same_tag_at_another_digest_is_built_anew(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials
) -> None:
    """Modal reuses a build by its definition: the alias in it (with the digest) keeps
    a moved tag from being served the old build."""
    first = await adapter.register_template(IMAGE, credentials)
    retagged = replace(IMAGE, digest="sha256:" + "cd" * 32)
    moved = await adapter.register_template(retagged, credentials)
    assert moved.template_id != first.template_id
    assert len(fake.state.builds_of(IMAGE.image)) == 2


async def test_a_worker_killed_mid_build_rejoins_the_same_build(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials, registry: Registry
) -> None:
    fake.state.build_s = 1.0
    doomed = asyncio.create_task(adapter.register_template(IMAGE, credentials))
    for _ in range(200):
        if fake.state.builds_of(IMAGE.image):
            break
        await asyncio.sleep(0.01)
    [build] = fake.state.builds_of(IMAGE.image)
    doomed.cancel()  # the worker dies while the build runs on
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert build.result is None

    restarted = new_adapter(registry)
    ref = await restarted.register_template(IMAGE, credentials)
    assert ref.template_id == build.image_id and build.built
    assert fake.state.builds_of(IMAGE.image) == [build]
    assert (await restarted.template_progress(ref, credentials)).state == "ready"
    await restarted.aclose()


async def test_a_failing_image_ends_failed_with_modals_reason(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials, registry: Registry
) -> None:
    broken = replace(IMAGE, image="ghcr.io/acme/fail:1")
    ref = await adapter.register_template(broken, credentials)  # returned, not raised
    [build] = fake.state.builds_of("ghcr.io/acme/fail:1")
    assert ref.template_id == build.image_id and not build.built

    progress = await adapter.template_progress(ref, credentials)
    assert progress.state == "failed" and progress.reason is not None
    assert f"Image build for {ref.template_id} failed." in progress.reason  # Modal's words
    assert "manifest unknown" in progress.reason  # the cause, from the build log
    assert "Error: reading manifest of ghcr.io/acme/fail:1: manifest unknown" in progress.logs
    assert (await adapter.template_progress(ref, credentials)).logs == ()

    afresh = new_adapter(registry)  # after a restart Modal cannot load it: failed still
    assert (await afresh.template_progress(ref, credentials)).state == "failed"
    with pytest.raises(ProviderRejected):  # nothing was made: a create may fall back
        await afresh.provision(spec(registry, ref.template_id), credentials)
    assert fake.state.sandboxes == {}
    await afresh.aclose()


async def test_a_refused_token_is_a_rejection(
    fake: FakeModal, adapter: ModalAdapter, credentials: Credentials
) -> None:
    wrong = Credentials("platform", {**credentials.values, "token_secret": "as-wrong"})
    with pytest.raises(ProviderRejected, match="token was refused") as refused:
        await adapter.register_template(IMAGE, wrong)
    assert "as-wrong" not in str(refused.value) and fake.state.images == {}
