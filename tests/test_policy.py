"""Consumer policy over real NATS: limits that concurrent requests on several workers
cannot overshoot, slots that come back, requests a consumer profile does not allow,
operators' overrides, and no lock shared between tenants."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import uuid
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.credits import Balance, Ledger
from sandboxer.errors import QuotaExceeded
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings, default_extensions_dir
from schemas import (
    DestroyRequest,
    ErrorCode,
    LedgerEntry,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
    TenantLimits,
)
from tests.conftest import Start
from tests.helpers import provision, reconcile, sandboxer, wait_for_status

#: profile.burst-sandbox on the stub: 0.009 USD held for its 900 s TTL.
BURST_HOLD = Decimal("0.009000")


def deployment(tmp_path: Path, **consumer: Any) -> Path:
    """The shipped extensions plus `consumer.limited` listing the tenants `q*`."""
    extensions = tmp_path / "extensions"
    shutil.copytree(default_extensions_dir(), extensions)
    body = {"kind": "consumer", "id": "consumer.limited", "tenants": ["q1", "q2", "q3"]}
    (extensions / "consumer.limited.yaml").write_text(json.dumps({**body, **consumer}))
    return extensions


async def provision_all(
    client: Client, tenant: str, n: int, profile: str = "profile.burst-sandbox", **fields: Any
) -> list[SandboxStatus]:
    """`n` provisions published at once; their settled statuses."""

    async def one(i: int) -> SandboxStatus:
        request = ProvisionRequest(
            request_id=f"{tenant}-{i}-{uuid.uuid4().hex[:6]}",
            tenant=tenant,
            profile=profile,
            **fields,
        )
        status = await client.provision(request, wait_s=60)
        assert status is not None
        return status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def outcomes(statuses: list[SandboxStatus]) -> Counter[str]:
    return Counter(s.error.code.value if s.error else s.state.value for s in statuses)


async def test_200_concurrent_provisions_on_three_workers_get_exactly_the_limit(
    tmp_path: Path, start_worker: Start, observer: Client, js: JetStreamContext
) -> None:
    extensions = deployment(tmp_path, tenant_limits={"max_concurrent": 10})
    for _ in range(3):
        await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q1", Decimal(100), "funds")
    statuses = await provision_all(observer, "q1", 200)
    assert outcomes(statuses) == {"ready": 10, "quota_exceeded": 190}
    refused = next(s for s in statuses if s.error)
    assert refused.state is SandboxState.FAILED
    assert refused.error is not None and "max_concurrent" in refused.error.message
    balance = await Ledger(js).balance("q1")
    assert len(balance.holds) == 10 and balance.held == 10 * BURST_HOLD


async def test_concurrent_requests_never_pass_an_hourly_cap(
    tmp_path: Path, start_worker: Start, observer: Client, js: JetStreamContext
) -> None:
    cap = 5 * BURST_HOLD + Decimal("0.004")  # room for 5, not 6
    extensions = deployment(tmp_path, tenant_limits={"hourly_usd": str(cap)})
    for _ in range(3):
        await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q2", Decimal(100), "funds")
    statuses = await provision_all(observer, "q2", 50)
    assert outcomes(statuses) == {"ready": 5, "quota_exceeded": 45}
    now = datetime.now(UTC)
    spent = (await Ledger(js).balance("q2")).hour_spend(now)
    assert spent == 5 * BURST_HOLD <= cap


async def test_a_slot_comes_back_after_destroy_failure_and_ttl_expiry(
    tmp_path: Path,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
) -> None:
    extensions = deployment(tmp_path, tenant_limits={"max_concurrent": 1})
    await start_billing(extensions_dir=extensions)
    await Ledger(js).grant("q3", Decimal(100), "funds")
    await start_worker(extensions_dir=extensions)

    first = await provision(observer, "q3", "profile.burst-sandbox")
    assert first.state is SandboxState.READY
    [refused] = await provision_all(observer, "q3", 1)
    assert refused.error is not None and refused.error.code is ErrorCode.QUOTA_EXCEEDED
    # destroyed (and billed): the slot is free again
    done = await observer.destroy(
        DestroyRequest(request_id="d1", tenant="q3", sandbox_id=first.sandbox_id), wait_s=20
    )
    assert done is not None and done.state is SandboxState.DESTROYED
    await _until_free(js, "q3")
    # a TTL that runs out frees it too
    short = await provision(observer, "q3", "profile.burst-sandbox", ttl_s=5)
    assert short.state is SandboxState.READY
    await wait_for_status(
        observer, short.sandbox_id, lambda s: s.state is SandboxState.DESTROYED, 20
    )
    await _until_free(js, "q3")
    assert (await provision(observer, "q3", "profile.burst-sandbox")).state is SandboxState.READY


async def _until_free(js: JetStreamContext, tenant: str) -> None:
    await _until_holds(js, tenant, 0)


async def test_a_failed_provision_frees_its_slot(
    tmp_path: Path,
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDBOXER_STUB_REJECT_RATE", "1")  # every create refused
    extensions = deployment(tmp_path, tenant_limits={"max_concurrent": 1})
    await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q1", Decimal(100), "funds")
    for _ in range(3):  # each would need the one slot
        failed = await provision(observer, "q1", "profile.burst-sandbox")
        assert failed.error is not None, failed
        assert failed.error.code is ErrorCode.PROVIDER_REJECTED, failed
    assert (await Ledger(js).balance("q1")).holds == {}


async def test_what_a_consumer_profile_does_not_allow_is_policy_denied(
    tmp_path: Path, start_worker: Start, observer: Client, js: JetStreamContext
) -> None:
    extensions = deployment(
        tmp_path,
        profiles=["profile.burst-sandbox", "profile.modal-gpu"],
        gpu_types=["T4"],
        ttl={"default_s": 60, "max_s": 600},
    )
    await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q1", Decimal(100), "funds")
    for profile, ttl_s, reason in (
        ("profile.e2b-burst", None, "may not use profile.e2b-burst"),
        ("profile.modal-gpu", None, "may not have GPU H100 (allowed: T4)"),
        ("profile.burst-sandbox", 900, "its longest: 600 s"),
    ):
        status = await provision(observer, "q1", profile, ttl_s=ttl_s)
        assert status.error is not None and status.error.code is ErrorCode.POLICY_DENIED
        assert reason in status.error.message, status.error
        assert status.extension_id is None  # refused before routing: nothing held
    ready = await provision(observer, "q1", "profile.burst-sandbox")
    assert ready.expires_at is not None
    assert ready.expires_at - ready.created_at == timedelta(seconds=60)  # the consumer's
    assert (await Ledger(js).balance("q1")).holds == {ready.sandbox_id: Decimal("0.000600")}


async def test_an_operators_override_applies_at_once_and_is_kept(
    tmp_path: Path,
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
) -> None:
    extensions = deployment(tmp_path)  # no limits in the profile
    await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q1", Decimal(100), "funds")
    env = {"SANDBOXER_EXTENSIONS_DIR": str(extensions)}
    code, out, err = await sandboxer(
        settings, "policy", "set", "q1", "--max-concurrent", "0", "--reason", "abuse", **env
    )
    assert code == 0, err
    await asyncio.sleep(2.5)  # workers read the overrides every 2 s
    refused = await provision(observer, "q1", "profile.burst-sandbox")
    assert refused.error is not None and refused.error.code is ErrorCode.QUOTA_EXCEEDED
    code, out, err = await sandboxer(settings, "policy", "show", "q1", "--json", **env)
    shown = json.loads(out)
    assert shown["limits"]["max_concurrent"] == 0 and shown["history"][0]["reason"] == "abuse"
    assert (await sandboxer(settings, "policy", "set", "q1", "--clear", **env))[0] == 0
    await asyncio.sleep(2.5)
    ready = await provision(observer, "q1", "profile.burst-sandbox")
    assert ready.state is SandboxState.READY
    code, out, err = await sandboxer(settings, "usage", "q1", "--json", **env)
    assert code == 0, err
    used = json.loads(out)["used"]
    assert used["max_concurrent"] == "1" and Decimal(used["hourly_usd"]) == BURST_HOLD
    code, _, err = await sandboxer(settings, "policy", "set", "q1", **env)
    assert code == 1 and "give limits to set, or --clear" in err


# -- the journal's part ------------------------------------------------------------


def _entry(kind: str, name: str, amount: str, at: datetime) -> LedgerEntry:
    """An entry of sandbox `sbx-<name repeated>` (none for a grant)."""
    sandbox_id = None if kind == "grant" else f"sbx-{name * 24}"
    return LedgerEntry(
        entry_id=f"{kind}-{name}",
        kind=kind,
        tenant="t",
        amount_usd=Decimal(amount),
        sandbox_id=sandbox_id,
        at=at,
    )


def test_spend_counts_in_the_hour_a_sandbox_was_created_in() -> None:
    noon = datetime(2026, 12, 1, 12, 30, tzinfo=UTC)
    balance = Balance()
    balance.apply(_entry("grant", "g", "100", noon))
    balance.apply(_entry("hold", "a", "1.0", noon))  # created at 12:30
    balance.apply(_entry("hold", "b", "2.0", noon + timedelta(minutes=40)))  # at 13:10
    balance.apply(_entry("debit", "a", "0.25", noon + timedelta(minutes=50)))  # billed 13:20
    balance.apply(_entry("release", "a", "1.0", noon + timedelta(minutes=50)))
    balance.apply(_entry("release", "b", "2.0", noon + timedelta(minutes=55)))  # failed
    assert balance.hour_spend(noon) == Decimal("0.25")  # a's debit, in a's hour
    assert balance.hour_spend(noon + timedelta(hours=1)) == 0  # b cost nothing
    assert balance.day_spend(noon + timedelta(hours=1)) == Decimal("0.25")
    assert balance.day_spend(noon + timedelta(days=1)) == 0
    limits = TenantLimits(hourly_usd=Decimal("0.30"), max_concurrent=1)
    balance.check(limits, f"sbx-{'c' * 24}", Decimal("0.05"), noon)  # 0.25 + 0.05 fits
    with pytest.raises(QuotaExceeded, match="hourly_usd"):
        balance.check(limits, f"sbx-{'c' * 24}", Decimal("0.06"), noon)
    balance.apply(_entry("hold", "c", "0.01", noon + timedelta(minutes=1)))
    with pytest.raises(QuotaExceeded, match="max_concurrent"):
        balance.check(limits, f"sbx-{'d' * 24}", Decimal("0.01"), noon)


async def test_a_hot_tenant_never_queues_another_tenants_holds(js: JetStreamContext) -> None:
    """Tenants whose names shared a lock stripe before: while one tenant's append is
    stuck, the other's goes through."""
    ledger = Ledger(js)
    # 'hot-1' and 'cold-37' fell on the same of the 64 stripes (crc32 % 64).
    await ledger.grant("hot-1", Decimal(10), "g")
    await ledger.grant("cold-37", Decimal(10), "g")
    stuck, release = asyncio.Event(), asyncio.Event()
    catch_up = ledger._catch_up

    async def slow(tenant: str) -> Any:
        if tenant == "hot-1":
            stuck.set()
            await release.wait()
        return await catch_up(tenant)

    ledger._cache.clear()
    ledger._catch_up = slow  # type: ignore[method-assign]
    hot = asyncio.create_task(ledger.hold("hot-1", "sbx-" + "1" * 24, Decimal(1)))
    await stuck.wait()
    try:
        assert await asyncio.wait_for(ledger.hold("cold-37", "sbx-" + "2" * 24, Decimal(1)), 5)
    finally:
        release.set()
        await hot


# -- fair scheduling ------------------------------------------------------------------


async def test_waiting_handlers_take_turns_by_consumer_weight_and_tenant() -> None:
    """One slot, a backlog from two consumers: `big` (weight 2, tenants x and y) and
    `small` (weight 1): the slot goes big, big, small, ..., x and y in turn."""
    from consumers.delivery import InFlight

    started: list[str] = []
    done: dict[str, asyncio.Event] = {}

    def job(name: str) -> Any:
        done[name] = asyncio.Event()

        async def run() -> None:
            started.append(name)
            await done[name].wait()

        return run

    in_flight = InFlight(1, max_queued=100, weight=lambda c: 2 if c == "big" else 1)
    await in_flight.start(job("first"), key=lambda: ("big", "x"))  # takes the slot
    for i in range(4):  # all queued: big's first, in the order they came
        await in_flight.start(job(f"x{i}"), key=lambda: ("big", "x"))
        await in_flight.start(job(f"y{i}"), key=lambda: ("big", "y"))
    for i in range(3):
        await in_flight.start(job(f"s{i}"), key=lambda: ("small", "z"))
    assert in_flight.queued == 11
    await asyncio.sleep(0)
    for _ in range(11):  # finish the running one: the slot goes to the next in turn
        done[started[-1]].set()
        for _ in range(5):
            await asyncio.sleep(0)
    assert started == [
        "first",
        *("x0", "y0", "s0"),
        *("x1", "y1", "s1"),
        *("x2", "y2", "s2"),
        *("x3", "y3"),
    ], started


async def test_one_tenants_backlog_does_not_delay_another(
    start_worker: Start, observer: Client, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """400 provisions of one tenant queued behind 8 slots at 0.5 s each (25 s first come
    first served): another tenant's request is ready in about one provider call, and
    nothing of the backlog is lost."""
    monkeypatch.setenv("SANDBOXER_STUB_LATENCY_S", "0.5")
    await start_worker(max_in_flight=8)
    ledger = Ledger(js)
    await ledger.grant("noisy", Decimal(100), "funds")
    await ledger.grant("victim", Decimal(100), "funds")
    backlog = [
        ProvisionRequest(request_id=f"n{i}", tenant="noisy", profile="profile.burst-sandbox")
        for i in range(400)
    ]
    for request in backlog:
        await observer.js.publish("sandbox.provision", request.model_dump_json().encode())
    await asyncio.sleep(1.0)  # the backlog is fetched and queued
    loop = asyncio.get_running_loop()
    began = loop.time()
    ready = await provision(observer, "victim", "profile.burst-sandbox", wait_s=20)
    waited = loop.time() - began
    assert ready.state is SandboxState.READY and waited < 3.0, waited
    done = [s async for s in _statuses(observer) if s.tenant == "noisy" and s.state.settled]
    assert len(done) < 200, "the backlog was not waiting at all"


async def _statuses(client: Client) -> Any:
    for status in await client.statuses():
        yield status


async def test_route_explain_shows_the_policy(tmp_path: Path, settings: Settings) -> None:
    extensions = deployment(
        tmp_path, profiles=["profile.burst-sandbox"], tenant_limits={"max_concurrent": 3}
    )
    env = {"SANDBOXER_EXTENSIONS_DIR": str(extensions)}
    args = ("route", "explain", "--tenant", "q1", "--json")
    code, out, err = await sandboxer(settings, *args, "--profile", "profile.burst-sandbox", **env)
    assert code == 0, err
    policy = json.loads(out)["policy"]
    assert policy["admission"] == "admitted" and "max_concurrent=3" in policy["limits"]
    code, out, err = await sandboxer(settings, *args, "--profile", "profile.e2b-burst", **env)
    assert code == 1 and "policy_denied" in err and "may not use profile.e2b-burst" in err


async def test_a_sigkilled_worker_leaks_no_slot(
    tmp_path: Path,
    spawn_worker: Any,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
) -> None:
    """Three provisions held at max_concurrent 3, their worker SIGKILLed mid-create:
    the next worker finishes them on the same three slots (a fourth is refused), a
    reconciliation pass changes nothing, and a destroy gives one back."""
    extensions = deployment(tmp_path, tenant_limits={"max_concurrent": 3})
    env = {"SANDBOXER_EXTENSIONS_DIR": str(extensions)}
    await Ledger(js).grant("q1", Decimal(100), "funds")
    first = spawn_worker(SANDBOXER_STUB_LATENCY_S="30", **env)
    requests = [
        ProvisionRequest(request_id=f"k{i}", tenant="q1", profile="profile.burst-sandbox")
        for i in range(3)
    ]
    for request in requests:
        await observer.provision(request)
    ids = [sandbox_id_for("q1", r.request_id) for r in requests]
    for sandbox_id in ids:
        await wait_for_status(
            observer, sandbox_id, lambda s: s.state is SandboxState.PROVISIONING, 30
        )
    first.send_signal(signal.SIGKILL)
    first.wait()
    spawn_worker(SANDBOXER_STUB_LATENCY_S="0", **env)
    for sandbox_id in ids:
        await wait_for_status(observer, sandbox_id, lambda s: s.state is SandboxState.READY, 30)
    [refused] = await provision_all(observer, "q1", 1)
    assert refused.error is not None and refused.error.code is ErrorCode.QUOTA_EXCEEDED
    findings = await reconcile(
        replace(settings, extensions_dir=extensions), js, extension_id="ext.saas-stub"
    )
    assert {f.action for f in findings} <= {"keep"}, findings
    assert set((await Ledger(js).balance("q1")).holds) == set(ids)
    await start_billing(extensions_dir=extensions)
    done = await observer.destroy(
        DestroyRequest(request_id="d", tenant="q1", sandbox_id=ids[0]), wait_s=20
    )
    assert done is not None and done.state is SandboxState.DESTROYED
    await _until_holds(js, "q1", 2)
    assert (await provision(observer, "q1", "profile.burst-sandbox")).state is SandboxState.READY


async def _until_holds(js: JetStreamContext, tenant: str, n: int) -> None:
    for _ in range(200):
        if len((await Ledger(js).balance(tenant)).holds) == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{tenant} holds {(await Ledger(js).balance(tenant)).holds}")


# -- provider accounts ------------------------------------------------------------------


async def test_a_full_provider_account_routes_to_the_next_and_byok_counts_apart(
    tmp_path: Path,
    openbao: Any,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
    monkeypatch: pytest.MonkeyPatch,
    settings: Settings,
) -> None:
    """E2B's platform account allows 2 sandboxes: the third goes to the next route
    (the stub) instead of to a 429; a tenant with its own E2B key has its own 2; a
    destroyed sandbox gives its slot back."""
    import hvac

    from sandboxer.dev.fakes.e2b import FakeE2B
    from tests.conftest import OPENBAO_ROOT_TOKEN

    extensions = deployment(tmp_path)
    manifest = (extensions / "ext.e2b.yaml").read_text()
    (extensions / "ext.e2b.yaml").write_text(manifest + "account_limits:\n  max_concurrent: 2\n")
    platform, own = f"e2b_{uuid.uuid4().hex}", f"e2b_{uuid.uuid4().hex}"
    kv = hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN).secrets.kv.v2
    kv.create_or_update_secret(
        path="sandboxer/platform/e2b", secret={"api_key": platform}, mount_point="secret"
    )
    kv.create_or_update_secret(
        path="sandboxer/tenants/q2/ext.e2b", secret={"api_key": own}, mount_point="secret"
    )
    try:
        with FakeE2B(api_keys={platform, own}) as fake:
            monkeypatch.setenv("SANDBOXER_E2B_API_URL", fake.url)
            monkeypatch.setenv("BAO_ADDR", openbao.url)
            monkeypatch.setenv("BAO_TOKEN", OPENBAO_ROOT_TOKEN)
            monkeypatch.setenv("SANDBOXER_BAO_CACHE_TTL_S", "0")
            await start_worker(extensions_dir=extensions)
            await start_billing(extensions_dir=extensions)
            for tenant in ("q1", "q2"):
                await Ledger(js).grant(tenant, Decimal(100), "funds")
            first = [await provision(observer, "q1", "profile.burst-sandbox") for _ in range(3)]
            assert [s.extension_id for s in first] == ["ext.e2b", "ext.e2b", "ext.saas-stub"]
            assert len(fake.alive()) == 2  # no third create was sent to a full account
            code, out, err = await sandboxer(
                settings,
                *("route", "explain", "--tenant", "q1", "--profile", "profile.burst-sandbox"),
                "--json",
                SANDBOXER_EXTENSIONS_DIR=str(extensions),
            )
            assert code == 0, err
            [e2b] = [r for r in json.loads(out)["routes"] if r["extension_id"] == "ext.e2b"]
            assert e2b["verdict"].startswith("account_full: ~e2b-platform: max_concurrent")
            own_key = [await provision(observer, "q2", "profile.burst-sandbox") for _ in range(2)]
            assert [(s.extension_id, s.credential_source) for s in own_key] == [
                ("ext.e2b", "byok"),
                ("ext.e2b", "byok"),
            ]
            platform_slots = await Ledger(js).account("~e2b-platform")
            assert set(platform_slots.holds) == {s.sandbox_id for s in first[:2]}
            assert len((await Ledger(js).account("~e2b-byok-q2")).holds) == 2
            await observer.destroy(
                DestroyRequest(request_id="d", tenant="q1", sandbox_id=first[0].sandbox_id),
                wait_s=20,
            )
            again = await provision(observer, "q1", "profile.burst-sandbox")
            assert again.extension_id == "ext.e2b"
    finally:
        kv.delete_metadata_and_all_versions(path="sandboxer/platform/e2b", mount_point="secret")
        kv.delete_metadata_and_all_versions(
            path="sandboxer/tenants/q2/ext.e2b", mount_point="secret"
        )


async def test_a_consumer_as_a_whole_has_its_own_limit(
    tmp_path: Path,
    start_worker: Start,
    start_billing: Start,
    observer: Client,
    js: JetStreamContext,
) -> None:
    extensions = deployment(tmp_path, max_concurrent=4)
    for _ in range(2):
        await start_worker(extensions_dir=extensions)
    await start_billing(extensions_dir=extensions)
    for tenant in ("q1", "q2"):
        await Ledger(js).grant(tenant, Decimal(100), "funds")
    both = await asyncio.gather(provision_all(observer, "q1", 6), provision_all(observer, "q2", 6))
    statuses = [s for group in both for s in group]
    assert outcomes(statuses) == {"ready": 4, "quota_exceeded": 8}
    refused = next(s for s in statuses if s.error)
    assert (
        refused.error is not None and "consumer.limited (all its tenants)" in refused.error.message
    )
    assert len((await Ledger(js).account("~consumer-limited")).holds) == 4
    ready = next(s for s in statuses if s.state is SandboxState.READY)
    await observer.destroy(
        DestroyRequest(request_id="d", tenant=ready.tenant, sandbox_id=ready.sandbox_id),
        wait_s=20,
    )
    assert len((await Ledger(js).account("~consumer-limited")).holds) == 3
    assert (await provision(observer, "q2", "profile.burst-sandbox")).state is SandboxState.READY


async def test_reconciliation_frees_what_a_settled_sandbox_still_holds(
    tmp_path: Path,
    start_worker: Start,
    observer: Client,
    js: JetStreamContext,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker killed between a failure's writes would leave the failed sandbox's
    credit hold and consumer slot taken: a reconciliation pass gives them back."""
    monkeypatch.setenv("SANDBOXER_STUB_REJECT_RATE", "1")
    extensions = deployment(tmp_path, max_concurrent=5)
    await start_worker(extensions_dir=extensions)
    await Ledger(js).grant("q1", Decimal(100), "funds")
    failed = await provision(observer, "q1", "profile.burst-sandbox")
    assert failed.state is SandboxState.FAILED
    ledger = Ledger(js)  # what the killed worker had written (as a later route's holds)
    await ledger.hold("q1", failed.sandbox_id, BURST_HOLD, route=2)
    await ledger.hold("~consumer-limited", failed.sandbox_id, Decimal(0), route=2)
    findings = await reconcile(replace(settings, extensions_dir=extensions), js)
    [freed] = [f for f in findings if f.action == "free"]
    assert freed.sandbox_id == failed.sandbox_id
    assert freed.reason == "failed but still held: credit hold, consumer slot"
    assert (await Ledger(js).balance("q1")).holds == {}
    assert (await Ledger(js).account("~consumer-limited")).holds == {}
    again = await reconcile(replace(settings, extensions_dir=extensions), js)
    assert not [f for f in again if f.action == "free"]  # nothing twice
