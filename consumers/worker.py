"""The provisioner as a FastStream app: durable pull consumers on `sandbox.provision` and
`sandbox.destroy`, each running up to `max_in_flight` handlers at once."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from contextlib import AsyncExitStack

from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.registry import Registry
from consumers.app import Lifeline, Subscription, connect, serve
from consumers.deadletter import on_max_deliveries
from consumers.delivery import Delivery, settle
from consumers.reconcile import ACTIONS_TAKEN, Reconciler, take_turn
from consumers.wiring import WorkerParts, open_worker
from sandboxer.connect import connection_of
from sandboxer.settings import Settings
from sandboxer.topology import (
    ADVISORY_CONSUMER,
    ADVISORY_STREAM,
    BILLING_STREAM,
    DESTROY_CONSUMER,
    DESTROY_SUBJECT,
    EXTEND_CONSUMER,
    EXTEND_SUBJECT,
    LEASE_BUCKET,
    MAX_DELIVERIES_ADVISORIES,
    METER_STREAM,
    PROVISION_CONSUMER,
    PROVISION_SUBJECT,
    REQUESTS_STREAM,
    consumer_of,
    destroy_subject,
    extend_subject,
    provision_subject,
)

log = logging.getLogger("sandboxer.worker")


class _Tenant(BaseModel):
    """The tenant a request is for, whatever else it holds (pydantic's parser refuses
    deep nesting with an error, never a crash)."""

    model_config = ConfigDict(extra="ignore")

    tenant: str = Field(default="", max_length=64)


def fair_key(registry: Registry) -> Callable[[str, bytes], tuple[str, str]]:
    """(consumer, tenant) of a request: the queue it waits in when every slot is taken.
    A plain subject's request waits with its tenant's consumer; junk, in its own."""

    def key(subject: str, body: bytes) -> tuple[str, str]:
        try:
            tenant = _Tenant.model_validate_json(body).tenant
        except ValidationError:
            tenant = ""
        return consumer_of(subject) or registry.owner_of(tenant), tenant

    return key


def weight_of(registry: Registry) -> Callable[[str], int]:
    """A consumer's share of the slots (its profile's `weight`; 1 for others)."""

    def weight(consumer: str) -> int:
        manifest = registry.consumers.get(consumer)
        return manifest.weight if manifest else 1

    return weight


def subscriptions(
    parts: WorkerParts, js: JetStreamContext, settings: Settings
) -> list[Subscription]:
    """Requests on the plain subjects and on every consumer's own. A crash on the last
    provision attempt still gets two more deliveries before the server gives up (the
    handler itself fails the request at `max_deliver`); destroys wait for provisioning
    to settle, which is itself bounded, and retry outages for the long bound. Requests
    share the handler slots fairly by consumer and tenant."""
    fair = fair_key(parts.providers.registry)
    return [
        Subscription(
            REQUESTS_STREAM,
            PROVISION_CONSUMER,
            (PROVISION_SUBJECT, provision_subject("*")),
            parts.provisioning.on_provision,
            settings.max_deliver + 2,
            fair,
        ),
        Subscription(
            REQUESTS_STREAM,
            DESTROY_CONSUMER,
            (DESTROY_SUBJECT, destroy_subject("*")),
            parts.destroying.on_destroy,
            fair_key=fair,
        ),
        Subscription(
            REQUESTS_STREAM,
            EXTEND_CONSUMER,
            (EXTEND_SUBJECT, extend_subject("*")),
            parts.extending.on_extend,
            settings.max_deliver + 2,
            fair,
        ),
        advisory_subscription(js, settings),
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
        ADVISORY_STREAM,
        ADVISORY_CONSUMER,
        (f"{MAX_DELIVERIES_ADVISORIES}.>",),
        on_advisory,
        settings.max_deliver + 2,
    )


async def reconcile_forever(
    reconciler: Reconciler, js: JetStreamContext, settings: Settings
) -> None:
    """One reconciliation pass per deployment every `reconcile_every_s`, by whichever
    worker takes the turn first; each worker looks at a random point of the period."""
    leases = await js.key_value(LEASE_BUCKET)
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
            acted = [f for f in findings if f.action in ACTIONS_TAKEN]
            log.info("reconcile: %d sandboxes, %d acted on", len(findings), len(acted))


async def run_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the provisioner until `stop` is set (or SIGTERM/SIGINT), then drain.
    `ready` is set once both consumers are pulling."""
    async with AsyncExitStack() as stack:
        lifeline = Lifeline("sandboxer-worker")
        js = await connect(settings, lifeline, stack)
        parts = await open_worker(settings, js, stack)
        connects = await parts.connecting.subscribe(connection_of(js))
        stack.push_async_callback(parts.connecting.aclose)
        stack.push_async_callback(connects.unsubscribe)
        if settings.reconcile_every_s > 0:
            reconciler = parts.reconciler(grace_s=settings.reconcile_grace_s)
            task = asyncio.create_task(reconcile_forever(reconciler, js, settings))
            stack.callback(task.cancel)
        await serve(
            lifeline,
            js,
            subscriptions(parts, js, settings),
            settings,
            stop or asyncio.Event(),
            ready,
            weight_of(parts.providers.registry),
        )
