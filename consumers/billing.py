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
import hashlib
import json
import logging
import os
import signal
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from decimal import Decimal

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue
from pydantic import ValidationError

from adapters.finhub import FinHubClient, FinHubUnavailable, Verdict
from consumers.app import Subscription, connect, serve
from consumers.delivery import Delivery, settle
from sandboxer.credits import Ledger
from sandboxer.settings import Settings
from sandboxer.topology import (
    BILLING_BUCKET,
    BILLING_CONSUMER,
    BILLING_STREAM,
    DLQ_SUBJECT_PREFIX,
    EXPORT_CONSUMER,
    METER_STREAM,
    METER_SUBJECT_PREFIX,
    USAGE_SUBJECT,
)
from schemas import MeterEvent, UsageRecord, meter_event_adapter, usage_record_id, utcnow

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


async def dead_letter(
    js: JetStreamContext, consumer: str, key: str, body: Mapping[str, object]
) -> None:
    """Keep a message that cannot be processed on `billing.dlq.<consumer>`, with why."""
    await js.publish(
        f"{DLQ_SUBJECT_PREFIX}.{consumer}",
        json.dumps({**body, "at": utcnow().isoformat()}, default=str).encode(),
        headers={"Nats-Msg-Id": f"dlq-{consumer}-{key}"},
    )


async def dead_letter_invalid(
    js: JetStreamContext, consumer: str, data: bytes, error: ValidationError, delivery: Delivery
) -> None:
    """Dead-letter a message that does not validate (keyed by its content), and end
    its delivery: retrying cannot fix it."""
    log.error("%s: invalid message moved to the dead-letter subject: %s", consumer, error)
    key = hashlib.sha256(data).hexdigest()[:24]
    body = {
        "reason": f"invalid: {error.error_count()} errors",
        "data": data.decode(errors="replace"),
    }
    await dead_letter(js, consumer, key, body)
    await delivery.term()


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
            await dead_letter_invalid(self.js, "billing", data, exc, delivery)
            return
        if event.kind != "stopped":
            await delivery.ack()
            return

        async def give_up(exc: Exception) -> None:
            log.error("billing of %s failed for good: %s", event.sandbox_id, exc)
            body = {"reason": str(exc), "event": event.model_dump(mode="json")}
            await dead_letter(self.js, "billing", event.sandbox_id, body)

        await settle(
            f"billing {event.sandbox_id}",
            self._bill(event),
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
            await dead_letter_invalid(self.js, "finhub", data, exc, delivery)
            return

        async def give_up(exc: Exception) -> None:
            log.error("export of %s failed for good: %s", record.record_id, exc)

        await settle(
            f"export {record.record_id}",
            self._export(record),
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
        log.error("fin-hub refused %s for good: %s", record.record_id, outcome.detail)
        await dead_letter(
            self.js, "finhub", record.record_id,
            {"reason": "rejected by fin-hub", "status": outcome.status,
             "response": outcome.detail, "record": record.model_dump(mode="json")},
        )  # fmt: skip
        await self.markers.put(f"dead.{record.record_id}", str(outcome.status).encode())


async def run_billing(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the billing consumer, and the fin-hub exporter if a URL is configured."""
    async with AsyncExitStack() as stack:
        js = await connect(settings, "sandboxer-billing", stack)
        markers = await js.key_value(BILLING_BUCKET)
        billing = Billing(js, Ledger(js), markers, settings,
                          fault=os.environ.get("SANDBOXER_FAULT_INJECT", ""))  # fmt: skip
        subscriptions = [
            Subscription(METER_STREAM, BILLING_CONSUMER, f"{METER_SUBJECT_PREFIX}.>",
                         billing.on_meter),
        ]  # fmt: skip
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
            log.info("fin-hub export off (SANDBOXER_FIN_HUB_URL unset): records stay on %s",
                     USAGE_SUBJECT)  # fmt: skip
        await serve("billing", js, subscriptions, settings, stop or asyncio.Event(), ready)
