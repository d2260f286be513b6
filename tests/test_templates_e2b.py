"""ext.e2b registers built images as E2B templates, against the fake E2B control plane
(real HTTP on loopback, driven by the official SDK in tests/test_fake_e2b.py): a build
polled to ready creates sandboxes, the same image is never built twice, a failed build
says why, and lost answers or a crash mid-registration leave one build."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import pytest

from adapters.base import (
    AdapterContext,
    Credentials,
    SandboxSpec,
    TemplateBuildRef,
    TemplateImage,
    TemplateProgress,
)
from adapters.e2b import E2BAdapter
from adapters.registry import Registry
from sandboxer.dev.fakes.e2b import FakeE2B, Fault
from sandboxer.errors import ProviderFailed, ProviderRejected
from sandboxer.settings import Settings

IMAGE = TemplateImage(
    name="py-app",
    version="1.0.0",
    image="registry.example/team/py-app:1.0.0",
    digest="sha256:" + "ab" * 32,
    cpu=4,
    memory_mb=2048,
    start_cmd="python -m http.server 8000",
    ready_cmd="curl -sf localhost:8000",
)
REQUESTS = "POST /v3/templates"
STARTS = "POST /v2/templates/{id}/builds/{buildID}"


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The shipped manifests (ext.e2b's and profile.e2b-burst are the ones used)."""
    return Registry.load(Settings().extensions_dir)


@dataclass
class E2B:
    fake: FakeE2B
    key: Credentials
    registry: Registry

    def adapter(self) -> E2BAdapter:
        """A fresh adapter (a process of its own) pointed at the fake."""
        settings = Settings(
            deployment="test",
            adapter_env={"SANDBOXER_E2B_API_URL": self.fake.url, "SANDBOXER_E2B_BACKOFF_S": "0"},
        )
        return E2BAdapter(AdapterContext(self.registry.extensions["ext.e2b"], settings))

    def spec(self, template: str) -> SandboxSpec:
        """A sandbox of profile.e2b-burst from `template`."""
        return SandboxSpec(
            sandbox_id=f"sbx-{uuid.uuid4().hex[:24]}",
            tenant="acme",
            deployment="test",
            profile=self.registry.profile("profile.e2b-burst"),
            ttl_s=300,
            expires_at=datetime.now(UTC) + timedelta(seconds=300),
            template=template,
        )


@pytest.fixture
def e2b(registry: Registry) -> Iterator[E2B]:
    api_key = f"e2b_{uuid.uuid4().hex}"
    with FakeE2B(api_keys={api_key}) as fake:
        yield E2B(fake, Credentials("platform", {"api_key": api_key}), registry)


@pytest.fixture
async def adapter(e2b: E2B) -> AsyncIterator[E2BAdapter]:
    made = e2b.adapter()
    yield made
    await made.aclose()


async def poll_to_the_end(
    adapter: E2BAdapter, ref: TemplateBuildRef, key: Credentials
) -> list[TemplateProgress]:
    polls = [await adapter.template_progress(ref, key)]
    while polls[-1].state == "building" and len(polls) < 20:
        polls.append(await adapter.template_progress(ref, key))
    return polls


async def test_registered_image_is_built_to_ready_and_creates_sandboxes(
    e2b: E2B, adapter: E2BAdapter
) -> None:
    assert E2BAdapter.builds_templates is True
    ref = await adapter.register_template(IMAGE, e2b.key)
    [build] = e2b.fake.builds
    assert (ref.template_id, ref.build_id) == (build.template_id, build.build_id)
    assert (build.from_image, build.start_cmd, build.ready_cmd) == (
        IMAGE.image,
        IMAGE.start_cmd,
        IMAGE.ready_cmd,
    )
    assert (build.cpu_count, build.memory_mb) == (4, 2048)
    assert e2b.fake.registered[ref.template_id].alias == IMAGE.alias == "py-app-1-0-0-abababababab"

    building, ready = await poll_to_the_end(adapter, ref, e2b.key)
    assert (building.state, building.reason) == ("building", None)
    assert any(f"Requesting base image {IMAGE.image}" in line for line in building.logs)
    assert ready.state == "ready" and ready.reason is None
    assert any(line.endswith("[finalize] Template is ready") for line in ready.logs)
    assert not set(building.logs) & set(ready.logs)  # each poll, only the new lines
    assert (await adapter.template_progress(ref, e2b.key)).logs == ()

    # The template id and the alias both create sandboxes of the template's size.
    for template in (ref.template_id, IMAGE.alias):
        made = await adapter.provision(e2b.spec(template), e2b.key)
        running = await adapter.wait_ready(made, e2b.key)
        assert running.meter_fields == {"cpu_count": 4, "memory_mb": 2048}
        assert e2b.fake.sandboxes[made.provider_sandbox_id].template_id == ref.template_id


async def test_registering_the_same_image_again_builds_nothing(
    e2b: E2B, adapter: E2BAdapter
) -> None:
    first = await adapter.register_template(IMAGE, e2b.key)
    assert await adapter.register_template(IMAGE, e2b.key) == first  # while it builds
    await poll_to_the_end(adapter, first, e2b.key)
    restarted = e2b.adapter()  # another process, or this one after a restart
    assert await restarted.register_template(IMAGE, e2b.key) == first  # once ready
    assert e2b.fake.requests[REQUESTS] == 1 and e2b.fake.requests[STARTS] == 1
    assert len(e2b.fake.builds) == 1
    # A process that has read none of the log is given all of it.
    whole = await restarted.template_progress(first, e2b.key)
    assert whole.state == "ready" and len(whole.logs) == len(e2b.fake.builds[0].log_entries)
    await restarted.aclose()

    # Another version is another alias, and another template.
    other = await adapter.register_template(replace(IMAGE, version="1.0.1"), e2b.key)
    assert other.template_id != first.template_id and len(e2b.fake.builds) == 2


async def test_a_failing_image_ends_failed_with_e2b_reason(e2b: E2B, adapter: E2BAdapter) -> None:
    reason = f"failed to pull image {IMAGE.image}: manifest unknown"
    e2b.fake.failing_images[IMAGE.image] = reason
    ref = await adapter.register_template(IMAGE, e2b.key)
    *_, failed = await poll_to_the_end(adapter, ref, e2b.key)
    assert (failed.state, failed.reason) == ("failed", reason)
    assert any(f"error [base] {reason}" in line for line in failed.logs)
    with pytest.raises(ProviderRejected, match="not found"):  # no sandbox from it
        await adapter.provision(e2b.spec(IMAGE.alias), e2b.key)

    # Registering it again is trying again: a new build of the same template.
    del e2b.fake.failing_images[IMAGE.image]
    again = await adapter.register_template(IMAGE, e2b.key)
    assert again.template_id == ref.template_id and again.build_id != ref.build_id
    assert (await poll_to_the_end(adapter, again, e2b.key))[-1].state == "ready"
    assert e2b.fake.requests[REQUESTS] == 2 and len(e2b.fake.builds) == 2


async def test_a_lost_start_answer_is_retried_into_the_same_build(
    e2b: E2B, adapter: E2BAdapter
) -> None:
    # E2B started the build, the answer was lost; the repeated start is refused (400).
    e2b.fake.faults.append(Fault(drop_after_acting=True, path="/v2/templates/"))
    ref = await adapter.register_template(IMAGE, e2b.key)
    assert e2b.fake.requests[STARTS] == 2 and len(e2b.fake.builds) == 1
    assert (await poll_to_the_end(adapter, ref, e2b.key))[-1].state == "ready"


async def test_a_registration_that_never_started_its_build_is_resumed(
    e2b: E2B, adapter: E2BAdapter
) -> None:
    # The build was requested, then the start failed for good (or the worker died).
    e2b.fake.faults.append(Fault(status=500, should_retry="false", path="/v2/templates/"))
    with pytest.raises(ProviderFailed):
        await adapter.register_template(IMAGE, e2b.key)
    assert [b.status for b in e2b.fake.builds] == ["waiting"]
    ref = await adapter.register_template(IMAGE, e2b.key)
    assert ref.build_id == e2b.fake.builds[0].build_id  # the waiting build, started
    assert e2b.fake.requests[REQUESTS] == 1 and len(e2b.fake.builds) == 1
    assert (await poll_to_the_end(adapter, ref, e2b.key))[-1].state == "ready"


async def test_refusals_build_nothing_and_never_show_the_key(e2b: E2B, adapter: E2BAdapter) -> None:
    e2b.fake.templates[IMAGE.alias] = (2, 512)  # another team's template of that alias
    with pytest.raises(ProviderRejected, match="another team's"):
        await adapter.register_template(IMAGE, e2b.key)
    del e2b.fake.templates[IMAGE.alias]
    with pytest.raises(ProviderRejected, match="CPU count") as odd:  # E2B wants 1 or even
        await adapter.register_template(replace(IMAGE, cpu=3), e2b.key)
    wrong = Credentials("platform", {"api_key": f"e2b_wrong_{uuid.uuid4().hex}"})
    with pytest.raises(ProviderRejected, match="API key was refused") as refused:
        await adapter.register_template(IMAGE, wrong)
    assert wrong.values["api_key"] not in str(refused.value)
    assert e2b.key.values["api_key"] not in str(odd.value)
    assert e2b.fake.builds == [] and e2b.fake.requests[STARTS] == 0


async def test_a_long_build_log_is_handed_out_whole_and_once(e2b: E2B, adapter: E2BAdapter) -> None:
    ref = await adapter.register_template(IMAGE, e2b.key)
    [build] = e2b.fake.builds
    for n in range(250):  # more than the two pages E2B gives two polls
        build.log(f"step output {n}", step="1")
    polls = await poll_to_the_end(adapter, ref, e2b.key)
    assert [p.state for p in polls] == ["building", "ready"]
    assert len(polls[0].logs) == 100  # E2B's page; the rest once it is done
    handed_out = [line for p in polls for line in p.logs]
    assert len(handed_out) == len(build.log_entries) == len(set(handed_out))
    assert handed_out[-1].endswith("Template is ready")
