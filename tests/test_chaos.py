"""The chaos suite: SPEC guarantees 1, 5 and 6 under faults, each a figure that must be
zero. `make chaos` runs it at full size (SANDBOXER_CHAOS=full) and prints the table;
`make check` runs the same tests small, as a smoke.

- R1: replaying every provision and destroy changes nothing already applied.
- R2: workers SIGKILLed at random points lose no request and leave no orphan.
- R3: a three-node NATS cluster (replicas 3) losing a node under load loses nothing
  and doubles nothing.
- R6: generated bad payloads on every input subject crash nothing, stay in no
  redelivery loop, and each attributable one gets a `failed` status with a code.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from consumers.replay import Range
from consumers.wiring import open_worker
from sandboxer.client import Client
from sandboxer.credits import Ledger
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import Settings
from schemas import DestroyRequest, ProvisionRequest, SandboxState
from tests.conftest import Start
from tests.fake_finhub import FakeFinHub
from tests.helpers import (
    FIGURES,
    Cluster,
    deliveries,
    replay_all,
    stream_messages,
    stub_sandboxes,
    until_topology,
)


@dataclass(frozen=True)
class Scale:
    r1_sandboxes: int  # provisions, and as many destroys
    r2_rounds: int
    r2_per_round: int
    r3_sandboxes: int
    r6_per_subject: int


FULL = Scale(
    r1_sandboxes=5000, r2_rounds=10, r2_per_round=1000, r3_sandboxes=1000, r6_per_subject=250
)
SMOKE = Scale(r1_sandboxes=100, r2_rounds=2, r2_per_round=60, r3_sandboxes=60, r6_per_subject=40)
SCALE = FULL if os.environ.get("SANDBOXER_CHAOS") == "full" else SMOKE


def figure(name: str, value: int, detail: str = "") -> None:
    """Record a figure for the table printed at the end (tests/conftest.py)."""
    FIGURES.append((name, value, detail))


async def statuses_by_id(client: Client) -> dict[str, Any]:
    return {s.sandbox_id: s for s in await client.statuses()}


async def settled_count(client: Client, request_prefix: str) -> int:
    prefix = f"{request_prefix}-"
    statuses = await client.statuses()
    return sum(1 for s in statuses if s.request_id.startswith(prefix) and s.state.settled)


async def wait_all(
    client: Client, ids: Iterable[str], state: SandboxState, timeout_s: float = 120
) -> dict[str, Any]:
    """Every sandbox of `ids` in `state` (or the statuses as they are at the timeout)."""
    wanted = set(ids)
    deadline = asyncio.get_running_loop().time() + timeout_s
    found: dict[str, Any] = {}
    while True:
        try:
            found = await statuses_by_id(client)
        except Exception:  # the cluster is electing a leader: look again
            if asyncio.get_running_loop().time() > deadline:
                return found
            await asyncio.sleep(0.5)
            continue
        if all(i in found and found[i].state is state for i in wanted):
            return found
        if asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.25)


def is_in(statuses: dict[str, Any], sandbox_id: str, state: SandboxState) -> bool:
    return sandbox_id in statuses and statuses[sandbox_id].state is state


async def drained(
    js: JetStreamContext, consumers: Iterable[tuple[str, str]], timeout_s: float = 120
) -> int:
    """Wait until the consumers have nothing pending or unacked; what is left. A
    cluster electing a leader answers nothing for a while: look again."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        left = 0
        try:
            for stream, name in consumers:
                info = await js.consumer_info(stream, name)
                left += (info.num_pending or 0) + (info.num_ack_pending or 0)
        except Exception:
            if asyncio.get_running_loop().time() > deadline:
                raise
            left = -1
        if left == 0 or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.1)


REQUEST_CONSUMERS = [
    ("SANDBOX_REQUESTS", "provisioner-provision"),
    ("SANDBOX_REQUESTS", "provisioner-destroy"),
    ("SANDBOX_REQUESTS", "provisioner-extend"),
]
BILLING_CONSUMERS = [("SANDBOX_METER", "billing-meter"), ("BILLING", "finhub-export")]
TEMPLATE_CONSUMERS = [("TEMPLATES", "templates-build")]


async def publish_provisions(client: Client, tenants: list[str], count: int, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        tenant = tenants[i % len(tenants)]
        await client.provision(
            ProvisionRequest(
                request_id=f"{tag}-{i}", tenant=tenant, profile="profile.burst-sandbox"
            )
        )
        ids.append(sandbox_id_for(tenant, f"{tag}-{i}"))
    return ids


async def publish_destroys(client: Client, statuses: dict[str, Any], ids: list[str]) -> None:
    for sandbox_id in ids:
        status = statuses[sandbox_id]
        await client.destroy(
            DestroyRequest(
                request_id=f"d-{sandbox_id}", tenant=status.tenant, sandbox_id=sandbox_id
            )
        )


# -- R1 --------------------------------------------------------------------------------


async def test_r1_replaying_every_request_duplicates_nothing(
    start_worker: Start,
    start_billing: Start,
    settings: Settings,
    js: JetStreamContext,
    funded: tuple[str, ...],
) -> None:
    with FakeFinHub() as hub:
        await start_worker()
        await start_billing(fin_hub_url=hub.url)
        async with Client(settings.nats_url) as client:
            n = SCALE.r1_sandboxes
            ids = await publish_provisions(client, list(funded), n, "r1")
            ready = await wait_all(client, ids, SandboxState.READY)
            await publish_destroys(client, ready, ids)
            await wait_all(client, ids, SandboxState.DESTROYED)
            assert await drained(js, REQUEST_CONSUMERS + BILLING_CONSUMERS) == 0
            before = await effects(js, funded)
            assert before == (n, n, n), before
            assert len(hub.accepted) == n

            replayed = 0
            for subject in ("sandbox.provision", "sandbox.destroy"):
                summary = await replay_all(js, subject, Range())
                assert summary.effects["new"] == 0, summary.line()
                replayed += summary.replayed
            assert await drained(js, REQUEST_CONSUMERS + BILLING_CONSUMERS) == 0
            after = await effects(js, funded)
        posts_doubled = sum(count - 1 for count in hub.accepted_count.values())
    figure("R1 duplicate provider sandboxes", after[0] - before[0], f"{replayed} replayed")
    figure("R1 duplicate debits", after[1] - before[1])
    figure("R1 duplicate usage records", after[2] - before[2])
    figure("R1 duplicate fin-hub POSTs accepted", posts_doubled)
    assert replayed == 2 * n
    assert after == before and posts_doubled == 0


async def effects(js: JetStreamContext, tenants: Iterable[str]) -> tuple[int, int, int]:
    """(provider sandboxes, debits, usage records) as stored."""
    ledger = Ledger(js)
    debits = [e for t in tenants for e in await ledger.entries(t) if e.kind == "debit"]
    usage = await stream_messages(js, "BILLING", "billing.usage")
    return len(await stub_sandboxes(js)), len(debits), len(usage)


# -- R2 --------------------------------------------------------------------------------


async def test_r2_workers_killed_at_random_lose_nothing_and_leave_no_orphan(
    spawn_worker: Callable[..., subprocess.Popen[bytes]],
    settings: Settings,
    js: JetStreamContext,
    funded: tuple[str, ...],
) -> None:
    chance = random.Random(7)
    # Slow creates and few in flight per worker: the work spreads over all three, so
    # whichever is killed has creates in flight.
    stub = {"SANDBOXER_STUB_LATENCY_S": "0.1", "SANDBOXER_MAX_IN_FLIGHT": "16"}
    workers = [spawn_worker(**stub) for _ in range(3)]
    lost = orphans = doubled = kills = 0
    async with Client(settings.nats_url) as client:
        for round_no in range(SCALE.r2_rounds):
            tag = f"r2-{round_no}"
            publishing = asyncio.create_task(
                publish_provisions(client, list(funded), SCALE.r2_per_round, tag)
            )
            # A random point of the round: after a random share of it is done, so the
            # victim is mid-work (claims made, creates in flight).
            share = chance.uniform(0.1, 0.7)
            while await settled_count(client, tag) < share * SCALE.r2_per_round:
                await asyncio.sleep(0.02)
            victim = chance.randrange(len(workers))
            workers[victim].send_signal(signal.SIGKILL)
            workers[victim].wait()
            kills += 1
            workers[victim] = spawn_worker(**stub)
            ids = await publishing
            found = await wait_all(client, ids, SandboxState.READY)
            lost += sum(1 for i in ids if not is_in(found, i, SandboxState.READY))
        total = SCALE.r2_rounds * SCALE.r2_per_round
        redelivered = await deliveries(js, "provisioner-provision") - total
        doubled = len(await stub_sandboxes(js)) - total
        async with AsyncExitStack() as stack:
            reconciler = (await open_worker(settings, js, stack)).reconciler(grace_s=0)
            findings = await reconciler.run("ext.saas-stub")
            orphans = sum(1 for f in findings if f.action != "keep")
            after = await reconciler.run("ext.saas-stub", dry_run=True)
    figure(
        "R2 lost requests",
        lost,
        f"{total} provisions, {kills} SIGKILLs of 3 workers, {redelivered} redeliveries",
    )
    figure("R2 doubled provider sandboxes", doubled)
    figure(
        "R2 orphans after reconcile",
        sum(1 for f in after if f.action != "keep"),
        f"{orphans} found by the pass",
    )
    assert lost == 0 and doubled == 0
    assert [f for f in after if f.action != "keep"] == []


# -- R3 --------------------------------------------------------------------------------


async def test_r3_a_cluster_losing_a_node_under_load_loses_and_doubles_nothing(
    tmp_path: Path,
    settings: Settings,
    start_worker: Start,
    start_billing: Start,
) -> None:
    with Cluster(tmp_path / "cluster") as cluster:
        await until_topology(cluster.url, replicas=3)
        # The test's short delivery budget (3 deliveries, 0.1..0.5 s apart) is far below
        # a leader election: handlers ride it out within their delivery.
        cluster_settings = replace(settings, nats_url=cluster.url, replicas=3, ack_wait_s=3.0)
        async with Client(cluster.url, reconnect=True) as client:
            ledger = Ledger(client.js)
            for tenant in ("acme", "t1"):
                await ledger.grant(tenant, Decimal("1000"), "r3-funds")
            worker = await start_worker(**vars_of(cluster_settings))
            billing = await start_billing(**vars_of(cluster_settings))
            try:
                n = SCALE.r3_sandboxes
                ids: list[str] = []
                for i in range(n):
                    if i == n // 3:
                        victim = cluster.nodes[1].process
                        assert victim is not None
                        victim.kill()  # SIGKILL
                        victim.wait()
                        await asyncio.sleep(2)  # the load goes on against two nodes
                    if i == 2 * n // 3:
                        cluster.nodes[1].start(timeout_s=30)
                    tenant = ("acme", "t1")[i % 2]
                    request = ProvisionRequest(
                        request_id=f"r3-{i}",
                        tenant=tenant,
                        profile="profile.burst-sandbox",
                        ttl_s=60,
                    )
                    await publish_with_retry(client, request)
                    ids.append(sandbox_id_for(tenant, f"r3-{i}"))
                ready = await wait_all(client, ids, SandboxState.READY, timeout_s=180)
                lost = sum(1 for i in ids if not is_in(ready, i, SandboxState.READY))
                for sandbox_id in ids:
                    if sandbox_id in ready:
                        destroy = DestroyRequest(
                            request_id=f"d-{sandbox_id}",
                            tenant=ready[sandbox_id].tenant,
                            sandbox_id=sandbox_id,
                        )
                        await publish_with_retry(client, destroy)
                done = await wait_all(client, ids, SandboxState.DESTROYED, timeout_s=180)
                lost += sum(
                    1 for i in ids if i in ready and done[i].state is not SandboxState.DESTROYED
                )
                await drained(client.js, [("SANDBOX_METER", "billing-meter")], timeout_s=60)
                sandboxes, debits, usage = await effects(client.js, ("acme", "t1"))
            finally:
                await worker.stop()  # before the cluster goes away
                await billing.stop()
    figure("R3 lost effects", lost, f"{n} provisions+destroys, node n1 SIGKILLed and back")
    figure(
        "R3 doubled effects",
        (sandboxes - n) + (debits - n) + (usage - n),
        f"{sandboxes} sandboxes, {debits} debits, {usage} usage records",
    )
    assert lost == 0 and (sandboxes, debits, usage) == (n, n, n)


def vars_of(value: Settings) -> dict[str, Any]:
    names = ("nats_url", "replicas", "ack_wait_s", "max_deliver", "retry_backoff_s", "retry_cap_s")
    return {name: getattr(value, name) for name in names}


async def publish_with_retry(client: Client, request: ProvisionRequest | DestroyRequest) -> None:
    """Publish until the cluster acknowledges (a leader election takes seconds). The
    request id is the message id, so a retry after a lost ack is stored once."""
    subject = "sandbox.provision" if isinstance(request, ProvisionRequest) else "sandbox.destroy"
    for attempt in range(60):
        try:
            await client.js.publish(
                subject,
                request.model_dump_json().encode(),
                timeout=2,
                headers={"Nats-Msg-Id": f"{subject}.{request.tenant}.{request.request_id}"},
            )
            return
        except Exception:
            await asyncio.sleep(min(0.1 * 2**attempt, 1.0))
    raise AssertionError(f"could not publish {request.request_id}")


# -- R6 --------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
#: Bodies that name a tenant and a request id, so their failure can be answered, but are
#: invalid anyway (an unknown field, a wrong type, an out-of-range TTL...).
_attributable = st.fixed_dictionaries(
    {
        "tenant": st.sampled_from(["acme", "t1"]),
        "request_id": st.from_regex(r"\Ar6-[a-z0-9]{8}\Z"),
        "color": _json,
    },
    optional={
        "profile": st.sampled_from(["profile.burst-sandbox", "profile.nope", ""]),
        "ttl_s": st.integers(-5, 10**7) | st.text(max_size=4),
        "metadata": _json,
        "schema_version": st.integers(-1, 3),
    },
)
_payload = st.one_of(
    st.binary(max_size=48),
    _json.map(lambda v: json.dumps(v).encode()),
    _attributable.map(lambda v: json.dumps(v).encode()),
)


def generated_payloads(count: int) -> list[bytes]:
    found: list[bytes] = []

    @settings(
        max_examples=count, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(_payload)
    def collect(payload: bytes) -> None:
        found.append(payload)

    collect()
    return found


def extreme_payloads(max_payload: int) -> list[bytes]:
    """From nothing to the server's `max_payload`, and nesting to 100,000 levels."""
    sizes = [0, 1, 1024, 60 * 1024, 64 * 1024 + 1, 512 * 1024, max_payload - 1024]
    deep = [b"[" * n for n in (1_000, 60_000, 100_000)]
    return [
        *(b"x" * n for n in sizes),
        *deep,
        b'{"tenant": "acme", "request_id": "r6-deep", "metadata": ' + b"[" * 60_000,
        b'{"a": ' * 10_000 + b"1" + b"}" * 10_000,
        json.dumps({"tenant": "t1", "request_id": "r6-big", "pad": "x" * 60_000}).encode(),
    ]


#: Every subject a message from the bus reaches a sandboxer consumer on, and the two
#: whose records are money (meter events, the journal).
R6_SUBJECTS = [
    "sandbox.provision",
    "sandbox.provision.demo-app",
    "sandbox.destroy",
    "sandbox.destroy.demo-app",
    "sandbox.extend",
    "sandbox.extend.demo-app",
    "sandbox.meter.ext.saas-stub",
    "billing.usage",
    "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.SANDBOX_REQUESTS.provisioner-provision",
    "credits.ledger.t1.hold",  # + a unique entry id: one message per journal subject
    "credits.checkpoint.t1",  # junk checkpoints: a cold read must not believe them
    "template.build",  # an operator's subject, but the template worker takes anything
]


async def _publish_all(js: JetStreamContext, subject: str, payloads: list[bytes]) -> int:
    """Publish each payload on `subject`; how many the server refused at the door (over
    a stream's `max_msg_size`, or the client's `max_payload`)."""
    refused = 0
    for i, payload in enumerate(payloads):
        target = f"{subject}.junk-{i}" if subject.startswith("credits.ledger") else subject
        try:
            await js.publish(target, payload)
        except Exception:
            refused += 1
    return refused


#: Connect requests are core NATS: each must be answered (with a refusal), none lost.
R6_CONNECT_SUBJECTS = [
    f"sandbox.connect.demo-app.sbx-{'0' * 24}",
    "sandbox.connect.default.not-a-sandbox",
]


async def _ask_all(nc: Nats, subject: str, payloads: list[bytes]) -> tuple[int, int]:
    """Send each payload as a connect request: (unanswered or not refused, too big to
    send)."""
    unanswered = too_big = 0
    for payload in payloads:
        try:
            answer = await nc.request(subject, payload, timeout=5)
        except nats.errors.MaxPayloadError:
            too_big += 1
        except nats.errors.TimeoutError:
            unanswered += 1
        else:
            unanswered += b'"error"' not in answer.data
    return unanswered, too_big


async def _serves_end_to_end(client: Client, js: JetStreamContext, tenant: str) -> bool:
    """A provision gets ready, its destroy is metered, and billing debits it."""
    request = ProvisionRequest(
        request_id=f"r6-probe-{uuid.uuid4().hex[:8]}",
        tenant=tenant,
        profile="profile.burst-sandbox",
    )
    ready = await client.provision(request, wait_s=20)
    if ready is None or ready.state is not SandboxState.READY:
        return False
    destroy = DestroyRequest(
        request_id=f"d-{ready.sandbox_id}", tenant=tenant, sandbox_id=ready.sandbox_id
    )
    done = await client.destroy(destroy, wait_s=20)
    if done is None or done.state is not SandboxState.DESTROYED:
        return False
    for _ in range(400):
        if any(e.entry_id == f"debit-{ready.sandbox_id}" for e in await Ledger(js).entries(tenant)):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_r6_generated_bad_payloads_crash_nothing_and_loop_nowhere(
    start_worker: Start,
    start_billing: Start,
    start_templates: Start,
    settings: Settings,
    js: JetStreamContext,
    nc: Nats,
    funded: tuple[str, ...],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with FakeFinHub() as hub:
        worker = await start_worker()
        billing = await start_billing(fin_hub_url=hub.url)
        templates = await start_templates()
        generated = generated_payloads(SCALE.r6_per_subject)
        payloads = [*generated, *extreme_payloads(nc.max_payload)]
        refused = 0
        for subject in R6_SUBJECTS:
            refused += await _publish_all(js, subject, payloads)
        unanswered_connects = too_big = 0
        for subject in R6_CONNECT_SUBJECTS:
            lost, big = await _ask_all(nc, subject, payloads)
            unanswered_connects, too_big = unanswered_connects + lost, too_big + big
        left = await drained(js, REQUEST_CONSUMERS + BILLING_CONSUMERS + TEMPLATE_CONSUMERS)
        attributable = {}
        for payload in generated:
            try:
                body = json.loads(payload)
            except ValueError:
                continue
            if isinstance(body, dict) and "color" in body:
                attributable[sandbox_id_for(body["tenant"], body["request_id"])] = body
        async with Client(settings.nats_url) as client:
            statuses = await statuses_by_id(client)
            unanswered = [
                i
                for i in attributable
                if i not in statuses
                or statuses[i].state is not SandboxState.FAILED
                or statuses[i].error is None
            ]
            # Still at work, each of them: t1's journal holds the junk of the ledger
            # subjects, acme's is clean.
            serving = [await _serves_end_to_end(client, js, tenant) for tenant in ("acme", "t1")]
            # A restarted process reads t1's balance past the junk checkpoints.
            fresh = await Ledger(js).balance("t1")
            misled = int(fresh.balance != (await Ledger(js)._catch_up_from_scratch("t1")).balance)
        services = (worker, billing, templates)
        crashes = sum(1 for w in services if w.crashed) + caplog.text.count("handler crashed")
        disabled = sum(1 for w in services if w.crashed) + serving.count(False)
    total = len(payloads) * len(R6_SUBJECTS)
    figure("R6 worker crashes", crashes, f"{len(payloads)} payloads x {len(R6_SUBJECTS)} subjects")
    figure("R6 workers disabled", disabled, f"0 B to {nc.max_payload:,} B, nesting to 100,000")
    figure("R6 messages left in redelivery", left, f"{refused} of {total} refused at the door")
    figure(
        "R6 attributable payloads without a failed status",
        len(unanswered),
        f"{len(attributable)} attributable",
    )
    figure("R6 cold reads misled by a junk checkpoint", misled, "a fresh read of t1")
    figure(
        "R6 connect requests not refused",
        unanswered_connects,
        f"{len(payloads) * len(R6_CONNECT_SUBJECTS)} asked, {too_big} too big to send",
    )
    assert len(generated) * len(R6_SUBJECTS) >= (200 if SCALE is FULL else 4 * 40)
    assert crashes == 0 and disabled == 0 and left == 0 and unanswered == []
    assert unanswered_connects == 0 and misled == 0
