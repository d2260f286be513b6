"""The billing app (`sandboxer billing`): turns `stopped` meter events into exactly one
debit and one usage record each, and runs the fin-hub exporter (`consumers/export.py`)
when a fin-hub URL is configured.

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
from functools import partial

from nats.js import JetStreamContext
from pydantic import ValidationError

from consumers.app import Lifeline, Subscription, connect, serve
from consumers.delivery import Delivery, reject_invalid, settle
from consumers.export import exporter_subscription
from sandboxer.credits import Ledger
from sandboxer.markers import BillingMarkers
from sandboxer.money import debit_amount, pays_with_credits
from sandboxer.settings import Settings
from sandboxer.topology import BILLING_CONSUMER, METER_STREAM, METER_SUBJECT_PREFIX, USAGE_SUBJECT
from schemas import MeterEvent, UsageRecord, usage_record_id

log = logging.getLogger("sandboxer.billing")

#: Test hook: `SANDBOXER_FAULT_INJECT=kill-after-debit` makes the process SIGKILL
#: itself right after a first debit, to prove the crash window is safe.
FAULT_KILL_AFTER_DEBIT = "kill-after-debit"


def usage_record(event: MeterEvent) -> UsageRecord:
    """The usage record of a `stopped` event: what the provider charged, and what the
    tenant's credits were debited for it."""
    assert event.actual_usd is not None and event.stopped_at is not None
    assert event.duration_s is not None
    return UsageRecord(
        record_id=usage_record_id(event.sandbox_id),
        sandbox_id=event.sandbox_id,
        extension_id=event.extension_id,
        tenant=event.tenant,
        credential_source=event.credential_source,
        duration_s=event.duration_s,
        actual_usd=debit_amount(event.credential_source, event.actual_usd),
        provider_cost_usd=event.actual_usd,
        started_at=event.started_at,
        stopped_at=event.stopped_at,
    )


class Billing:
    """Debits `stopped` sandboxes and publishes their usage records."""

    def __init__(
        self,
        js: JetStreamContext,
        ledger: Ledger,
        markers: BillingMarkers,
        settings: Settings,
    ) -> None:
        self._js = js
        self._ledger = ledger
        self._markers = markers
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
        await settle(
            f"billing {event.sandbox_id}",
            partial(self._bill, event),
            delivery,
            self._settings,
            give_up=partial(self._failed_for_good, event),
            retry_transient_forever=True,
        )

    @staticmethod
    async def _failed_for_good(event: MeterEvent, exc: Exception) -> None:
        log.error("billing of %s failed for good: %s", event.sandbox_id, exc)

    async def _bill(self, event: MeterEvent) -> None:
        record = usage_record(event)
        debited = False
        if pays_with_credits(event.credential_source):
            debited = await self._ledger.bill(event.tenant, event.sandbox_id, record.actual_usd)
        if debited and self._settings.fault_inject == FAULT_KILL_AFTER_DEBIT:
            os.kill(os.getpid(), signal.SIGKILL)
        # Only a delivery that did not write the debit itself can be a replay.
        if not debited and await self._markers.published(record.record_id):
            return  # published before: nothing to do
        await self._js.publish(
            USAGE_SUBJECT,
            record.model_dump_json().encode(),
            headers={"Nats-Msg-Id": record.record_id},
        )
        await self._markers.mark_published(record.record_id)


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
        billing = Billing(js, Ledger(js), markers, settings)
        subscriptions = [
            Subscription(
                METER_STREAM, BILLING_CONSUMER, (f"{METER_SUBJECT_PREFIX}.>",), billing.on_meter
            ),
        ]
        if settings.fin_hub_url:
            subscriptions.append(await exporter_subscription(settings, markers, stack))
            log.info("fin-hub export on: %s", settings.fin_hub_url)
        else:
            log.info(
                "fin-hub export off (SANDBOXER_FIN_HUB_URL unset): records stay on %s",
                USAGE_SUBJECT,
            )
        await serve(lifeline, js, subscriptions, settings, stop or asyncio.Event(), ready)
