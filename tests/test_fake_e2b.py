"""The fake E2B control plane is faithful: the official `e2b` SDK drives it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypedDict

import pytest
from e2b import AsyncSandbox, SandboxQuery
from e2b.exceptions import AuthenticationException, RateLimitException

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
