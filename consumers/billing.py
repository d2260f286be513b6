"""The billing app (`sandboxer billing`): turns `stopped` meter events into exactly one
debit and one usage record each, and runs the fin-hub exporter (`consumers/export.py`)
when a fin-hub URL is configured. What it bills comes from its own records, not from
the event: the sandbox's status and the price its extension's formula makes of it.

Exactly once, here, means: every step is idempotent by a deterministic id and
durable, so a redelivery, a crash or a replay a week later repeats nothing that
already happened (see docs/payments.md):

- the debit is the journal entry `debit-<sandbox_id>`, which the ledger stream accepts
  once, ever;
- the usage record `usage-<sandbox_id>` is published with that `Nats-Msg-Id` (the
  BILLING stream deduplicates for a day) and then marked in the `sandboxer-billing`
  bucket (`sandboxer/markers.py`), which stops any later replay.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from decimal import Decimal
from functools import partial

from nats.js import JetStreamContext
from pydantic import ValidationError

from adapters.base import Usage
from consumers.app import Lifeline, Subscription, connect, serve
from consumers.delivery import Delivery, reject_invalid, retry_while_deliveries_remain, settle
from consumers.export import exporter_subscription
from consumers.metering import recorded_sandbox
from consumers.wiring import Providers, open_providers
from sandboxer import observe
from sandboxer.credits import Ledger
from sandboxer.errors import SandboxerError
from sandboxer.markers import BillingMarkers
from sandboxer.money import debit_amount, pays_with_credits
from sandboxer.settings import Settings
from sandboxer.statuses import StatusStore
from sandboxer.topology import BILLING_CONSUMER, METER_STREAM, METER_SUBJECT_PREFIX, USAGE_SUBJECT
from schemas import MeterEvent, SandboxStatus, UsageRecord, usage_record_id
from schemas.cloudevents import usage_record_headers

log = logging.getLogger("sandboxer.billing")

#: Test hook: `SANDBOXER_FAULT_INJECT=kill-after-debit` makes the process SIGKILL
#: itself right after a first debit, to prove the crash window is safe.
FAULT_KILL_AFTER_DEBIT = "kill-after-debit"


class Disagreement(SandboxerError):
    """A meter event (or usage record) that does not agree with sandboxer's own records:
    never billed, kept as a dead letter with what differs."""


def usage_record(status: SandboxStatus, usage: Usage) -> UsageRecord:
    """The usage record of a stopped sandbox, from its status and the price recomputed
    from it: what the provider charged, and what the tenant's credits pay."""
    assert status.extension_id is not None
    return UsageRecord(
        record_id=usage_record_id(status.sandbox_id),
        sandbox_id=status.sandbox_id,
        extension_id=status.extension_id,
        tenant=status.tenant,
        credential_source=status.credential_source,
        duration_s=usage.duration_s,
        actual_usd=debit_amount(status.credential_source, usage.actual_usd),
        provider_cost_usd=usage.actual_usd,
        started_at=usage.started_at,
        stopped_at=usage.stopped_at,
    )


def disagreements(event: MeterEvent, status: SandboxStatus, usage: Usage) -> list[str]:
    """What a `stopped` event says that the records (the status, and the price the
    extension's formula makes of it) do not."""
    said = {
        "tenant": (event.tenant, status.tenant),
        "extension_id": (event.extension_id, status.extension_id),
        "provider_sandbox_id": (event.provider_sandbox_id, status.provider_sandbox_id),
        "credential_source": (event.credential_source, status.credential_source),
        "started_at": (event.started_at, usage.started_at),
        "stopped_at": (event.stopped_at, usage.stopped_at),
        "duration_s": (event.duration_s, usage.duration_s),
        "actual_usd": (event.actual_usd, usage.actual_usd),
    }
    return [f"{name} {theirs} != {ours}" for name, (theirs, ours) in said.items() if theirs != ours]


class Billing:
    """Debits `stopped` sandboxes and publishes their usage records, for what the records
    say: the sandbox's status, and the price its extension's formula makes of it. An
    event is only the occasion; one that disagrees with the records is not billed."""

    def __init__(
        self,
        js: JetStreamContext,
        ledger: Ledger,
        markers: BillingMarkers,
        statuses: StatusStore,
        providers: Providers,
        settings: Settings,
    ) -> None:
        self._js = js
        self._ledger = ledger
        self._markers = markers
        self._statuses = statuses
        self._providers = providers
        self._settings = settings

    async def on_meter(self, data: bytes, delivery: Delivery) -> None:
        try:
            event = MeterEvent.model_validate_json(data)
        except ValidationError as exc:
            await reject_invalid(delivery, "MeterEvent", exc)
            return
        if event.kind != "stopped":
            await delivery.ack()  # nothing to bill yet
            return
        observe.bind(event.sandbox_id, event.tenant)
        await settle(
            f"billing {event.sandbox_id}",
            partial(self._bill, event, delivery),
            delivery,
            self._settings,
            give_up=partial(self._failed_for_good, event),
            retry_transient_forever=True,
        )

    @staticmethod
    async def _failed_for_good(event: MeterEvent, exc: Exception) -> None:
        log.error("billing of %s failed for good: %s", event.sandbox_id, exc)

    async def _bill(self, event: MeterEvent, delivery: Delivery) -> None:
        status = await self._stopped_status(event, delivery)
        assert status.extension_id is not None and status.destroyed_at is not None
        adapter = self._providers.router.adapter(status.extension_id)
        usage = adapter.meter_actual(recorded_sandbox(status), status.destroyed_at)
        differences = disagreements(event, status, usage)
        if differences:
            raise Disagreement(
                f"{event.event_id} disagrees with the records: {'; '.join(differences)}"
            )
        record = usage_record(status, usage)
        debited = False
        if pays_with_credits(status.credential_source):
            debited = await self._ledger.bill(
                status.tenant,
                status.sandbox_id,
                record.actual_usd,
                held=status.estimate_usd or Decimal(0),
            )
        else:  # BYOK: nothing to debit; its zero hold counted it against the limits
            await self._ledger.release(status.tenant, status.sandbox_id)
        if debited and self._settings.fault_inject == FAULT_KILL_AFTER_DEBIT:
            os.kill(os.getpid(), signal.SIGKILL)
        # Only a delivery that did not write the debit itself can be a replay.
        if not debited and await self._markers.published(record.record_id):
            return  # published before: nothing to do
        await self._js.publish(
            USAGE_SUBJECT,
            record.model_dump_json().encode(),
            headers=observe.trace_headers(
                {
                    "Nats-Msg-Id": record.record_id,
                    **usage_record_headers(record, self._settings.deployment),
                }
            ),
        )
        await self._markers.mark_published(record.record_id)

    async def _stopped_status(self, event: MeterEvent, delivery: Delivery) -> SandboxStatus:
        """The status of the event's sandbox, once it records the stop. A replica a
        little behind may not show it yet: a few deliveries are given; after that the
        event has no sandbox of ours behind it."""
        owner = self._providers.registry.owner_of(event.tenant)
        found = await self._statuses.locate(owner, event.sandbox_id)
        if found is not None and found[0].destroyed_at is not None:
            return found[0]
        what = "no such sandbox" if found is None else f"sandbox is {found[0].state}"
        retry_while_deliveries_remain(
            delivery, self._settings, f"{event.event_id}: {what}, not stopped (yet)"
        )
        raise Disagreement(f"{event.event_id} names no stopped sandbox of ours ({what})")


async def run_billing(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the billing consumer, and the fin-hub exporter if a URL is configured (a
    deployment with separate identities runs `run_exporter` on its own instead)."""
    async with AsyncExitStack() as stack:
        lifeline = Lifeline("sandboxer-billing")
        js = await connect(settings, lifeline, stack)
        markers = await BillingMarkers.open(js)
        providers = await open_providers(settings, stack, keys=False)
        statuses = await StatusStore.open(js)
        billing = Billing(js, Ledger(js), markers, statuses, providers, settings)
        subscriptions = [
            Subscription(
                METER_STREAM, BILLING_CONSUMER, (f"{METER_SUBJECT_PREFIX}.>",), billing.on_meter
            ),
        ]
        if settings.fin_hub_url:
            subscriptions.append(await exporter_subscription(settings, js, markers, stack))
            log.info("fin-hub export on: %s", settings.fin_hub_url)
        else:
            log.info(
                "fin-hub export off (SANDBOXER_FIN_HUB_URL unset): records stay on %s",
                USAGE_SUBJECT,
            )
        await serve(lifeline, js, subscriptions, settings, stop or asyncio.Event(), ready)
