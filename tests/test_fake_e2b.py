"""The fake E2B control plane is faithful: the official `e2b` SDK drives it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import pytest
from e2b import AsyncSandbox, AsyncTemplate, BuildException, SandboxQuery
from e2b.api.client.api.templates import get_templates_template_id
from e2b.api.client.models import TemplateWithBuilds
from e2b.api.client_async import get_api_client
from e2b.connection_config import ConnectionConfig
from e2b.exceptions import AuthenticationException, RateLimitException
from e2b.template.logger import LogEntry

from sandboxer.dev.fakes.e2b import FakeE2B, Fault


@pytest.fixture
def fake() -> Iterator[FakeE2B]:
    with FakeE2B() as server:
        yield server


class Opts(TypedDict):
    api_url: str
    api_key: str


def opts(fake: FakeE2B) -> Opts:
    return {"api_url": fake.url, "api_key": "e2b_test_key"}


async def test_sdk_create_get_list_kill(fake: FakeE2B) -> None:
    tags = {"sandboxer_deployment": "test", "sandboxer_tenant": "acme"}
    first = await AsyncSandbox.create(template="base", metadata=tags, timeout=120, **opts(fake))
    second = await AsyncSandbox.create(template="base", metadata=tags, **opts(fake))
    await AsyncSandbox.create(
        template="base", metadata={"sandboxer_deployment": "other"}, **opts(fake)
    )
    assert len(first.sandbox_id) == 20 and first.sandbox_id.isalnum()

    info = await AsyncSandbox.get_info(first.sandbox_id, **opts(fake))
    assert info.metadata == tags and info.cpu_count == 2 and info.memory_mb == 512
    assert (info.end_at - info.started_at).total_seconds() == pytest.approx(120, abs=1)

    pages, found = AsyncSandbox.list(query=SandboxQuery(metadata=tags), limit=1, **opts(fake)), []
    while pages.has_next:
        found += [s.sandbox_id for s in await pages.next_items()]
    assert sorted(found) == sorted([first.sandbox_id, second.sandbox_id])  # two pages

    assert await AsyncSandbox.kill(first.sandbox_id, **opts(fake)) is True
    assert await AsyncSandbox.kill(first.sandbox_id, **opts(fake)) is False  # already gone
    assert {s.sandbox_id for s in fake.alive()} >= {second.sandbox_id}


async def test_sdk_idempotency_key_replays_the_first_sandbox(fake: FakeE2B) -> None:
    a = await AsyncSandbox.create(template="base", idempotency_key="sbx-abc", **opts(fake))
    b = await AsyncSandbox.create(template="base", idempotency_key="sbx-abc", **opts(fake))
    assert a.sandbox_id == b.sandbox_id and len(fake.sandboxes) == 1


async def test_sdk_sees_rate_limits_and_bad_keys(fake: FakeE2B) -> None:
    fake.faults.append(Fault(status=429, should_retry="false"))
    with pytest.raises(RateLimitException):
        await AsyncSandbox.create(template="base", **opts(fake))
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(template="base", api_url=fake.url, api_key="wrong-key")
    assert fake.sandboxes == {}


async def test_sdk_reaches_a_sandbox_through_the_fake_edge(fake: FakeE2B) -> None:
    """`connect` hands back a private sandbox's tokens; envd answers the SDK with the
    access token only, and a port answers only with the traffic token."""
    created = await AsyncSandbox.create(
        template="base", network={"allow_public_traffic": False}, **opts(fake)
    )
    assert created.traffic_access_token  # private: a token is needed for its ports
    # The SDK, told where the edge is, routes by E2b-Sandbox-Id/-Port like sandbox.e2b.app.
    again = await AsyncSandbox.connect(
        created.sandbox_id, sandbox_url=fake.edge.base_url, **opts(fake)
    )
    assert again.traffic_access_token == created.traffic_access_token
    assert await again.is_running() is True
    host = again.get_host(8080)
    assert host == f"8080-{created.sandbox_id}.{fake.domain}"

    import httpx

    async with httpx.AsyncClient(base_url=fake.edge.base_url) as http:
        refused = await http.get("/", headers={"Host": host})
        token = {"e2b-traffic-access-token": created.traffic_access_token or ""}
        served = await http.get("/app", headers={"Host": host, **token})
    assert refused.status_code == 403 and "traffic access token" in refused.text
    assert served.status_code == 200
    assert served.json() == {"served_by": created.sandbox_id, "port": "8080", "path": "/app"}

    await AsyncSandbox.kill(created.sandbox_id, **opts(fake))
    assert await again.is_running() is False  # the edge answers 502 for a gone sandbox


# -- templates -------------------------------------------------------------------------

IMAGE = "registry.example/team/py-app:1.0.0"


async def test_sdk_builds_a_template_from_an_image_and_creates_from_it(fake: FakeE2B) -> None:
    template = (
        AsyncTemplate()
        .from_image(IMAGE)
        .set_start_cmd("python -m http.server 8000", "curl -sf localhost:8000")
    )
    assert await AsyncTemplate.exists("py-app", **opts(fake)) is False
    logs: list[LogEntry] = []
    info = await AsyncTemplate.build(
        template, "py-app", cpu_count=4, memory_mb=2048, on_build_logs=logs.append, **opts(fake)
    )
    assert len(info.template_id) == 20 and info.tags == ["default"]

    [build] = fake.builds
    assert (build.build_id, build.status) == (info.build_id, "ready")
    assert (build.from_image, build.start_cmd) == (IMAGE, "python -m http.server 8000")
    assert build.ready_cmd == "curl -sf localhost:8000" and build.polls == 2
    messages = [entry.message for entry in logs]
    assert f"Requesting base image {IMAGE}" in messages  # the fake's log reached the SDK
    assert messages.index("Building layers (1/2)") < messages.index("Template is ready")
    assert len(messages) == len(set(messages))  # each entry once: logsOffset honoured

    assert await AsyncTemplate.exists("py-app", **opts(fake)) is True
    assert await AsyncTemplate.exists("base", **opts(fake)) is True  # E2B's: a 403
    for name in ("py-app", info.template_id, f"{fake.team}/py-app"):
        sandbox = await AsyncSandbox.create(template=name, **opts(fake))
        detail = await AsyncSandbox.get_info(sandbox.sandbox_id, **opts(fake))
        assert (detail.template_id, detail.cpu_count, detail.memory_mb) == (
            info.template_id,
            4,
            2048,
        )


async def test_sdk_polls_a_background_build_by_log_offset(fake: FakeE2B) -> None:
    info = await AsyncTemplate.build_in_background(
        AsyncTemplate().from_image(IMAGE), "py-app:v1", **opts(fake)
    )
    assert info.tags == ["v1"]
    first = await AsyncTemplate.get_build_status(info, logs_offset=0, **opts(fake))
    assert first.status.value == "building"
    assert [e.message for e in first.log_entries][-1] == "Building layers (1/2)"
    offset = len(first.log_entries)
    second = await AsyncTemplate.get_build_status(info, logs_offset=offset, **opts(fake))
    assert second.status.value == "ready"
    assert [e.message for e in second.log_entries] == ["Template is ready"]
    assert await AsyncTemplate.exists("py-app:v1", **opts(fake)) is True
    assert await AsyncTemplate.exists("py-app:v2", **opts(fake)) is False  # no such tag

    # The template's record, as the generated client parses it.
    client = get_api_client(ConnectionConfig(api_url=fake.url, api_key="e2b_test_key"))
    answer = await get_templates_template_id.asyncio_detailed(info.template_id, client=client)
    assert isinstance(answer.parsed, TemplateWithBuilds)
    assert answer.parsed.aliases == ["py-app"]
    assert answer.parsed.names == [f"{fake.team}/py-app"]
    assert [str(b.build_id) for b in answer.parsed.builds] == [info.build_id]
    assert (answer.parsed.build_id, answer.parsed.cpu_count) == (info.build_id, 2)


async def test_sdk_sees_a_failed_build_with_e2b_reason(fake: FakeE2B) -> None:
    reason = f"failed to pull image {IMAGE}: manifest unknown"
    fake.failing_images[IMAGE] = reason
    with pytest.raises(BuildException, match="manifest unknown"):
        await AsyncTemplate.build(AsyncTemplate().from_image(IMAGE), "py-app", **opts(fake))
    [build] = fake.builds
    assert build.status == "error" and build.reason == {"message": reason, "step": "base"}
    assert "py-app" not in fake.templates  # nothing to create sandboxes from
    # The alias was claimed by the request all the same, as E2B claims it.
    assert await AsyncTemplate.exists("py-app", **opts(fake)) is True


async def test_sdk_build_requests_are_checked_as_e2b_checks_them(fake: FakeE2B) -> None:
    with pytest.raises(BuildException, match="CPU count"):
        await AsyncTemplate.build(
            AsyncTemplate().from_image(IMAGE), "py-app", cpu_count=3, **opts(fake)
        )
    with pytest.raises(BuildException, match="Invalid name"):
        await AsyncTemplate.build(AsyncTemplate().from_image(IMAGE), "py app", **opts(fake))
    assert fake.builds == []
