"""The provisioner as a FastStream app: durable pull consumers on `sandbox.provision` and
`sandbox.destroy`, each running up to `max_in_flight` handlers at once."""

from __future__ import annotations

import asyncio
import logging
import random
from contextlib import AsyncExitStack

from nats.js import JetStreamContext

from adapters.base import AdapterContext, SandboxAdapter
from consumers.app import Subscription, connect, serve
from consumers.deadletter import on_max_deliveries
from consumers.delivery import Delivery, KeepAlive, settle
from consumers.provisioner import Provisioner
from consumers.reconcile import Reconciler, take_turn
from sandboxer.credits import Ledger
from sandboxer.registry import Registry
from sandboxer.routing import Router
from sandboxer.settings import BaoSettings, Settings
from sandboxer.state import StatusStore
from sandboxer.topology import (
    ADVISORY_CONSUMER,
    ADVISORY_STREAM,
    BILLING_STREAM,
    DESTROY_CONSUMER,
    DESTROY_SUBJECT,
    LEASE_BUCKET,
    MAX_DELIVERIES_ADVISORIES,
    METER_STREAM,
    PROVISION_CONSUMER,
    PROVISION_SUBJECT,
    REQUESTS_STREAM,
)

log = logging.getLogger("sandboxer.worker")


def subscriptions(provisioner: Provisioner, settings: Settings) -> list[Subscription]:
    """A crash on the last provision attempt still gets two more deliveries before the
    server gives up (the handler itself fails the request at `max_deliver`); destroys
    wait for provisioning to settle, which is itself bounded, so they have no limit."""
    return [
        Subscription(
            REQUESTS_STREAM,
            PROVISION_CONSUMER,
            PROVISION_SUBJECT,
            provisioner.on_provision,
            settings.max_deliver + 2,
        ),
        Subscription(REQUESTS_STREAM, DESTROY_CONSUMER, DESTROY_SUBJECT, provisioner.on_destroy),
        advisory_subscription(provisioner.js, settings),
    ]


def advisory_subscription(js: JetStreamContext, settings: Settings) -> Subscription:
    """The durable consumer that turns `MAX_DELIVERIES` advisories of sandboxer's
    streams into dead letters (run by every worker; a message is kept once)."""
    watched = {REQUESTS_STREAM, METER_STREAM, BILLING_STREAM}

    async def on_advisory(data: bytes, delivery: Delivery) -> None:
        async def give_up(exc: Exception) -> None:
            log.error("max-deliveries advisory not turned into a dead letter: %s", exc)

        await settle(
            "max-deliveries advisory",
            lambda: on_max_deliveries(js, data, watched),
            delivery,
            settings,
            give_up=give_up,
        )

    return Subscription(
        ADVISORY_STREAM, ADVISORY_CONSUMER, f"{MAX_DELIVERIES_ADVISORIES}.>", on_advisory
    )


async def build_provisioner(
    settings: Settings, js: JetStreamContext, stack: AsyncExitStack
) -> Provisioner:
    """The provisioner with its adapters, router and OpenBao resolver (when `BAO_ADDR`
    is set), whose connections `stack` closes."""
    registry = Registry.load(settings.extensions_dir)
    adapters: dict[str, SandboxAdapter] = registry.build_adapters(
        {
            ext_id: AdapterContext(manifest, js, settings.deployment, settings.replicas)
            for ext_id, manifest in registry.extensions.items()
        }
    )
    for adapter in adapters.values():
        stack.push_async_callback(adapter.aclose)
    keepalive = KeepAlive(every_s=max(0.5, settings.ack_wait_s / 3))
    stack.push_async_callback(keepalive.aclose)
    bao = BaoSettings.from_env()
    resolver = None
    if bao is not None:
        from adapters.openbao import CredentialResolver  # hvac only when needed

        resolver = CredentialResolver(bao)
        stack.callback(resolver.close)
    log.info(
        "worker: nats=%s deployment=%s extensions=%s in-flight<=%d openbao=%s",
        settings.nats_url,
        settings.deployment,
        ",".join(adapters),
        settings.max_in_flight,
        bao.addr if bao else "off",
    )
    return Provisioner(
        js=js,
        registry=registry,
        router=Router(adapters, registry.extensions, resolver),
        statuses=await StatusStore.open(js),
        settings=settings,
        keepalive=keepalive,
        ledger=Ledger(js),
    )


async def reconcile_forever(provisioner: Provisioner, settings: Settings) -> None:
    """One reconciliation pass per deployment every `reconcile_every_s`, by whichever
    worker takes the turn first; each worker looks at a random point of the period."""
    reconciler = Reconciler(provisioner, grace_s=settings.reconcile_grace_s)
    leases = await provisioner.js.key_value(LEASE_BUCKET)
    key = f"reconcile.{settings.deployment}"
    while True:
        await asyncio.sleep(random.uniform(0.5, 1.0) * settings.reconcile_every_s)
        try:
            if not await take_turn(leases, key, settings.reconcile_every_s):
                continue
            findings = await reconciler.run()
        except Exception:  # a provider or OpenBao outage: try again next time
            log.exception("reconcile pass failed")
        else:
            acted = [f for f in findings if f.action not in ("keep", "wait")]
            log.info("reconcile: %d sandboxes, %d acted on", len(findings), len(acted))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the provisioner until `stop` is set (or SIGTERM/SIGINT), then drain.
    `ready` is set once both consumers are pulling."""
    async with AsyncExitStack() as stack:
        js = await connect(settings, "sandboxer-worker", stack)
        provisioner = await build_provisioner(settings, js, stack)
        if settings.reconcile_every_s > 0:
            task = asyncio.create_task(reconcile_forever(provisioner, settings))
            stack.callback(task.cancel)
        await serve(
            "worker",
            js,
            subscriptions(provisioner, settings),
            settings,
            stop or asyncio.Event(),
            ready,
        )
