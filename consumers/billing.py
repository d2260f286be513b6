"""The billing app (`sandboxer billing`): turns `stopped` meter events into exactly one
debit and one usage record each, and exports usage records to fin-hub.

Exactly once, here, means: every step is idempotent by a deterministic id and
durable, so a redelivery, a crash or a replay a week later repeats nothing that
already happened (see docs/payments.md):

- the debit is the journal entry `debit-<sandbox_id>`, which the ledger stream accepts
  once, ever;
- the usage record `usage-<sandbox_id>` is published with that `Nats-Msg-Id` (the
  BILLING stream deduplicates for a day) and then marked `usage.<id>` in the
  `sandboxer-billing` bucket, which stops any later replay;
- the exporter marks `exported.<id>` after fin-hub's 2xx and skips marked records; it
  acks only after that, so an outage of hours loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal
from functools import partial

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from adapters.finhub import FinHubClient, FinHubRejected, FinHubUnavailable, Verdict
from consumers.app import Subscription, connect, serve
from consumers.delivery import Delivery, settle
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from sandboxer.topology import (
    BILLING_BUCKET,
    BILLING_CONSUMER,
    BILLING_STREAM,
    EXPORT_CONSUMER,
    METER_STREAM,
    METER_SUBJECT_PREFIX,
    USAGE_SUBJECT,
)
from schemas import MeterEvent, UsageRecord, meter_event_adapter, usage_record_id

log = logging.getLogger("sandboxer.billing")

#: Test hook: `SANDBOXER_FAULT_INJECT=kill-after-debit` makes the process SIGKILL
#: itself right after a first debit, to prove the crash window is safe.
FAULT_KILL_AFTER_DEBIT = "kill-after-debit"


async def _marked(markers: KeyValue, key: str) -> bool:
    try:
        await markers.get(key)
    except KeyNotFoundError:
        return False
    return True


async def dead_letter_invalid(data: bytes, error: ValidationError, delivery: Delivery) -> None:
    """A message that does not validate: retrying cannot fix it, so keep it as a dead
    letter with why."""
    await delivery.dead_letter(f"invalid: {error.error_count()} errors: {error}")


@dataclass
class Billing:
    """Debits `stopped` sandboxes and publishes their usage records."""

    js: JetStreamContext
    ledger: Ledger
    markers: KeyValue
    settings: Settings
    fault: str = ""

    async def on_meter(self, data: bytes, delivery: Delivery) -> None:
        try:
            event = meter_event_adapter.validate_json(data)
        except ValidationError as exc:
            await dead_letter_invalid(data, exc, delivery)
            return
        if event.kind != "stopped":
            await delivery.ack()
            return

        async def give_up(exc: Exception) -> None:
            log.error("billing of %s failed for good: %s", event.sandbox_id, exc)

        await settle(
            f"billing {event.sandbox_id}",
            partial(self._bill, event),
            delivery,
            self.settings,
            give_up=give_up,
            retry_transient_forever=True,
        )

    async def _bill(self, event: MeterEvent) -> None:
        tenant, sandbox_id = event.tenant, event.sandbox_id
        assert event.actual_usd is not None and event.stopped_at is not None
        assert event.duration_s is not None
        if event.credential_source == "byok":
            # The tenant pays the provider directly; sandboxer held and charges nothing.
            billed, debited = Decimal(0), False
        else:
            billed = event.actual_usd
            debited = await self.ledger.settle(tenant, sandbox_id, billed)
        if debited and self.fault == FAULT_KILL_AFTER_DEBIT:
            os.kill(os.getpid(), signal.SIGKILL)
        record = UsageRecord(
            record_id=usage_record_id(sandbox_id),
            sandbox_id=sandbox_id,
            extension_id=event.extension_id,
            tenant=tenant,
            credential_source=event.credential_source,
            duration_s=event.duration_s,
            actual_usd=billed,
            provider_cost_usd=event.actual_usd,
            started_at=event.started_at,
            stopped_at=event.stopped_at,
        )
        marker = f"usage.{record.record_id}"
        # Only a delivery that did not write the debit itself can be a replay.
        if not debited and await _marked(self.markers, marker):
            return  # published before: nothing to do
        await self.js.publish(
            USAGE_SUBJECT,
            record.model_dump_json().encode(),
            headers={"Nats-Msg-Id": record.record_id},
        )
        await self.markers.put(marker, b"published")


@dataclass
class Exporter:
    """POSTs usage records to fin-hub; acks only after fin-hub took them."""

    js: JetStreamContext
    fin_hub: FinHubClient
    markers: KeyValue
    settings: Settings

    async def on_usage(self, data: bytes, delivery: Delivery) -> None:
        try:
            record = UsageRecord.model_validate_json(data)
        except ValidationError as exc:
            await dead_letter_invalid(data, exc, delivery)
            return

        async def give_up(exc: Exception) -> None:
            log.error("export of %s failed for good: %s", record.record_id, exc)

        await settle(
            f"export {record.record_id}",
            partial(self._export, record),
            delivery,
            self.settings,
            give_up=give_up,
            retry_transient_forever=True,
        )

    async def _export(self, record: UsageRecord) -> None:
        if await _marked(self.markers, f"exported.{record.record_id}"):
            return
        outcome = await self.fin_hub.post(record)
        if outcome.verdict is Verdict.DELIVERED:
            await self.markers.put(f"exported.{record.record_id}", str(outcome.status).encode())
            return
        if outcome.verdict is Verdict.RETRY:
            # Retried by `settle` with backoff and without limit: an outage of hours
            # only delays the record.
            raise FinHubUnavailable(f"fin-hub: {outcome.detail}")
        await self.markers.put(f"dead.{record.record_id}", str(outcome.status).encode())
        raise FinHubRejected(f"fin-hub refused {record.record_id} for good: {outcome.detail}")


async def run_billing(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the billing consumer, and the fin-hub exporter if a URL is configured."""
    async with AsyncExitStack() as stack:
        js = await connect(settings, "sandboxer-billing", stack)
        markers = await js.key_value(BILLING_BUCKET)
        billing = Billing(
            js, Ledger(js), markers, settings, fault=os.environ.get("SANDBOXER_FAULT_INJECT", "")
        )
        subscriptions = [
            Subscription(
                METER_STREAM, BILLING_CONSUMER, f"{METER_SUBJECT_PREFIX}.>", billing.on_meter
            ),
        ]
        if settings.fin_hub_url:
            fin_hub = FinHubClient(
                settings.fin_hub_url,
                token=Settings.fin_hub_token(),
                timeout_s=settings.fin_hub_timeout_s,
            )
            stack.push_async_callback(fin_hub.aclose)
            exporter = Exporter(js, fin_hub, markers, settings)
            subscriptions.append(
                Subscription(BILLING_STREAM, EXPORT_CONSUMER, USAGE_SUBJECT, exporter.on_usage)
            )
            log.info("fin-hub export on: %s", settings.fin_hub_url)
        else:
            log.info(
                "fin-hub export off (SANDBOXER_FIN_HUB_URL unset): records stay on %s",
                USAGE_SUBJECT,
            )
        await serve("billing", js, subscriptions, settings, stop or asyncio.Event(), ready)
