"""Meter events and usage records are also CloudEvents 1.0 (binary mode: `ce-*`
headers beside the v1 payload), as the official CloudEvents SDK reads them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime

from cloudevents.core.bindings.http import HTTPMessage, from_binary, from_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from nats.js import JetStreamContext

from sandboxer.client import Client
from sandboxer.settings import Settings
from sandboxer.topology import StoredMessage, stored_messages
from schemas import MeterEvent, UsageRecord
from schemas.cloudevents import structured
from tests.conftest import Start
from tests.helpers import destroy, provision


async def stored(js: JetStreamContext, stream: str, subject: str) -> list[StoredMessage]:
    return [message async for message in stored_messages(js, stream, subject)]


def as_sdk_event(message: StoredMessage) -> CloudEvent:
    """The message read by the SDK: NATS's `ce-*` headers are HTTP's binary mode."""
    headers = dict(message.headers)
    headers["content-type"] = headers.pop("ce-datacontenttype")
    event = from_binary(HTTPMessage(headers, message.data), JSONFormat(), CloudEvent)
    assert isinstance(event, CloudEvent)
    return event


async def until_stored(
    js: JetStreamContext, stream: str, subject: str, count: int
) -> list[StoredMessage]:
    for _ in range(200):
        found = await stored(js, stream, subject)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"{subject}: {len(found)} of {count} stored")


async def test_meter_events_and_usage_records_are_cloudevents(
    settings: Settings, js: JetStreamContext, start_worker: Start, start_billing: Start
) -> None:
    await start_worker()
    await start_billing()
    async with Client(settings.nats_url) as client:
        ready = await provision(client, "acme", "profile.burst-sandbox")
        await destroy(client, ready)
    meter = await until_stored(js, "SANDBOX_METER", "sandbox.meter.ext.saas-stub", 2)
    usage = await until_stored(js, "BILLING", "billing.usage", 1)

    source = f"/sandboxer/{settings.deployment}/ext.saas-stub"
    checks: list[tuple[StoredMessage, str, str, Callable[[bytes], datetime]]] = [
        (
            meter[0],
            "dev.sandboxer.sandbox.started",
            source,
            lambda d: MeterEvent.model_validate_json(d).started_at,
        ),
        (
            meter[1],
            "dev.sandboxer.sandbox.stopped",
            source,
            lambda d: MeterEvent.model_validate_json(d).stopped_at or datetime.min,
        ),
        (
            usage[0],
            "dev.sandboxer.usage.recorded",
            f"/sandboxer/{settings.deployment}/billing",
            lambda d: UsageRecord.model_validate_json(d).stopped_at,
        ),
    ]
    for message, kind, where, when in checks:
        event = as_sdk_event(message)
        body = json.loads(message.data)
        assert event.get_type() == kind and event.get_source() == where
        assert event.get_id() == body.get("event_id", body.get("record_id"))
        assert event.get_subject() == "acme"
        assert event.get_time() == when(message.data)
        assert event.get_data() == body  # the data is today's payload, unchanged
        # The structured form (what OpenMeter's HTTP API takes) is the same event.
        form = HTTPMessage(
            {"content-type": "application/cloudevents+json"},
            json.dumps(structured(message.headers, message.data)).encode(),
        )
        again = from_structured(form, JSONFormat(), CloudEvent)
        assert again.get_attributes() == event.get_attributes()
        assert again.get_data() == body
