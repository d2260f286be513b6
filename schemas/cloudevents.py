"""Meter events and usage records as CloudEvents 1.0, in binary content mode: the
event's attributes travel as `ce-*` headers beside the unchanged v1 payload, which is
the event's `data` (`application/json`). Consumers of v1 see nothing new; a CloudEvents
consumer (OpenMeter, Knative, a CloudEvents SDK) reads the same message as an event.
Why binary and not a v2 payload: docs/payments.md, "CloudEvents".

Every attribute is deterministic, so a redelivered, replayed or republished event is
the same event (`id` + `source` identify it):

| attribute | meter event                               | usage record                    |
|-----------|-------------------------------------------|---------------------------------|
| id        | `event_id` (`<sandbox_id>.started|stopped`)| `record_id` (`usage-<sandbox>`) |
| source    | `/sandboxer/<deployment>/<extension_id>`  | `/sandboxer/<deployment>/billing` |
| type      | `dev.sandboxer.sandbox.started|stopped`   | `dev.sandboxer.usage.recorded`  |
| subject   | the tenant                                | the tenant                      |
| time      | `started_at` or `stopped_at`              | `stopped_at`                    |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from schemas.billing import UsageRecord
from schemas.meter import MeterEvent

SPEC_VERSION = "1.0"
TYPE_PREFIX = "dev.sandboxer"
PREFIX = "ce-"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _headers(event_id: str, source: str, kind: str, tenant: str, at: datetime) -> dict[str, str]:
    return {
        "ce-specversion": SPEC_VERSION,
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": f"{TYPE_PREFIX}.{kind}",
        "ce-subject": tenant,
        "ce-time": _rfc3339(at),
        "ce-datacontenttype": "application/json",
    }


def meter_event_headers(event: MeterEvent, deployment: str) -> dict[str, str]:
    """The `ce-*` headers of a meter event."""
    at = event.stopped_at if event.kind == "stopped" and event.stopped_at else event.started_at
    source = f"/sandboxer/{deployment}/{event.extension_id}"
    return _headers(event.event_id, source, f"sandbox.{event.kind}", event.tenant, at)


def usage_record_headers(record: UsageRecord, deployment: str) -> dict[str, str]:
    """The `ce-*` headers of a usage record."""
    source = f"/sandboxer/{deployment}/billing"
    return _headers(record.record_id, source, "usage.recorded", record.tenant, record.stopped_at)


def structured(headers: Mapping[str, str], data: bytes) -> dict[str, Any]:
    """The message as a structured CloudEvent (the JSON event format), for sinks that
    take events over HTTP: `POST` it as `application/cloudevents+json` (OpenMeter's
    `/api/v1/events`). ValueError if the message carries no CloudEvent."""
    attributes = {
        name[len(PREFIX) :]: value for name, value in headers.items() if name.startswith(PREFIX)
    }
    if attributes.get("specversion") != SPEC_VERSION:
        raise ValueError("not a CloudEvents 1.0 message (no ce-specversion: 1.0 header)")
    return {**attributes, "data": json.loads(data)}
