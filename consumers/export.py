"""The fin-hub exporter: POSTs each usage record on `billing.usage` to fin-hub, and acks
only after fin-hub took it (a 2xx, or 409: it has it), so an outage of hours loses
nothing. Taken records are marked `exported.<id>` and skipped ever after; records
fin-hub refuses for good are marked and kept as dead letters with fin-hub's answer."""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from functools import partial

from nats.js import JetStreamContext
from pydantic import ValidationError

from adapters.finhub import FinHubClient, FinHubRejected, FinHubUnavailable, Verdict
from consumers.app import Lifeline, Subscription, connect, serve
from consumers.delivery import (
    Delivery,
    KeepAlive,
    reject_invalid,
    retry_while_deliveries_remain,
    settle,
)
from sandboxer import observe
from sandboxer.credits import Ledger
from sandboxer.errors import SandboxerError
from sandboxer.markers import BillingMarkers
from sandboxer.money import pays_with_credits
from sandboxer.settings import Settings
from sandboxer.topology import BILLING_STREAM, EXPORT_CONSUMER, USAGE_SUBJECT
from schemas import UsageRecord, utcnow

log = logging.getLogger("sandboxer.export")


class Unbacked(SandboxerError):
    """A usage record that billing did not publish, or whose debit differs: never
    exported, kept as a dead letter."""


class Exporter:
    """POSTs usage records to fin-hub; acks only after fin-hub took them. A record is
    exported only if billing's own marks say it published it, and the journal holds its
    debit (for credits-paid sandboxes) at the same amount."""

    def __init__(
        self,
        fin_hub: FinHubClient,
        markers: BillingMarkers,
        ledger: Ledger,
        settings: Settings,
        keepalive: KeepAlive,
    ) -> None:
        self._fin_hub = fin_hub
        self._markers = markers
        self._ledger = ledger
        self._settings = settings
        self._keepalive = keepalive

    async def on_usage(self, data: bytes, delivery: Delivery) -> None:
        try:
            record = UsageRecord.model_validate_json(data)
        except ValidationError as exc:
            await reject_invalid(delivery, "UsageRecord", exc)
            return
        observe.bind(record.sandbox_id, record.tenant)
        await settle(
            f"export {record.record_id}",
            partial(self._export, record, delivery),
            delivery,
            self._settings,
            give_up=partial(self._failed_for_good, record),
            retry_transient_forever=True,
        )

    @staticmethod
    async def _failed_for_good(record: UsageRecord, exc: Exception) -> None:
        log.error("export of %s failed for good: %s", record.record_id, exc)

    async def _export(self, record: UsageRecord, delivery: Delivery) -> None:
        if await self._markers.exported(record.record_id):
            return
        await self._check_backed(record, delivery)
        # A POST may outlast the ack wait: redelivered meanwhile, the record would be
        # POSTed again by the handler of the copy.
        async with self._keepalive.watch(delivery):
            outcome = await self._fin_hub.post(record)
        observe.FINHUB_EXPORTS.labels(outcome.verdict.value).inc()
        if outcome.verdict is Verdict.DELIVERED:
            await self._markers.mark_exported(record.record_id, outcome.status)
            lag = utcnow() - record.stopped_at
            observe.FINHUB_EXPORT_LAG_SECONDS.observe(max(lag.total_seconds(), 0.0))
            return
        if outcome.verdict is Verdict.RETRY:
            # Retried by `settle` with backoff and without limit: an outage of hours
            # only delays the record.
            raise FinHubUnavailable(f"fin-hub: {outcome.detail}")
        await self._markers.mark_refused(record.record_id, outcome.status)
        raise FinHubRejected(f"fin-hub refused {record.record_id} for good: {outcome.detail}")

    async def _check_backed(self, record: UsageRecord, delivery: Delivery) -> None:
        """Billing publishes a record, then marks it: a record seen before its mark gets
        a few deliveries; one never marked, or whose debit differs, is not exported."""
        if not await self._markers.published(record.record_id):
            retry_while_deliveries_remain(
                delivery, self._settings, f"{record.record_id}: not marked published (yet)"
            )
            raise Unbacked(f"{record.record_id}: billing never published it")
        if pays_with_credits(record.credential_source):
            debit = await self._ledger.entry(record.tenant, "debit", f"debit-{record.sandbox_id}")
            if debit is None or debit.amount_usd != record.actual_usd:
                journal = "none" if debit is None else str(debit.amount_usd)
                raise Unbacked(
                    f"{record.record_id}: {record.actual_usd} USD, the journal's debit: {journal}"
                )


async def exporter_subscription(
    settings: Settings, js: JetStreamContext, markers: BillingMarkers, stack: AsyncExitStack
) -> Subscription:
    """The exporter's durable consumer on `billing.usage`, its client closed by `stack`."""
    assert settings.fin_hub_url is not None
    fin_hub = FinHubClient(
        settings.fin_hub_url, token=settings.fin_hub_token, timeout_s=settings.fin_hub_timeout_s
    )
    stack.push_async_callback(fin_hub.aclose)
    keepalive = KeepAlive.for_ack_wait(settings, closed_by=stack)
    exporter = Exporter(fin_hub, markers, Ledger(js), settings, keepalive)
    return Subscription(BILLING_STREAM, EXPORT_CONSUMER, (USAGE_SUBJECT,), exporter.on_usage)


async def run_exporter(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the fin-hub exporter alone (`sandboxer export`), as its own identity."""
    if not settings.fin_hub_url:
        raise ValueError("the exporter needs SANDBOXER_FIN_HUB_URL")
    async with AsyncExitStack() as stack:
        lifeline = Lifeline("sandboxer-export")
        js = await connect(settings, lifeline, stack)
        markers = await BillingMarkers.open(js)
        subscription = await exporter_subscription(settings, js, markers, stack)
        log.info("fin-hub export on: %s", settings.fin_hub_url)
        await serve(lifeline, js, [subscription], settings, stop or asyncio.Event(), ready)
