"""The message contract as an AsyncAPI 3.0 document: every subject sandboxer's
processes publish or consume, who does which, and the schema of what travels there,
generated from the pydantic models and the subject names the code uses (so it cannot
say what the code does not). `sandboxer schemas asyncapi` prints or writes it;
`docs/asyncapi.json` is the committed copy, and a test fails when it drifts.

Operations are the service's own view (AsyncAPI's rule): it *receives* provisions and
destroys and *sends* statuses, meter events and usage records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from consumers.deadletter import H_CONSUMER, H_DELIVERIES, H_REASON, H_RETRY, H_SEQ, H_STREAM
from consumers.replay import H_REPLAY
from sandboxer.topology import (
    CHECKPOINT_SUBJECT_PREFIX,
    CONNECT_SUBJECT_PREFIX,
    DESTROY_SUBJECT,
    DLQ_SUBJECT_PREFIX,
    EXTEND_SUBJECT,
    LEDGER_SUBJECT_PREFIX,
    METER_SUBJECT_PREFIX,
    PROVISION_SUBJECT,
    SCHEDULE_SUBJECT_PREFIX,
    STATUS_SUBJECT_PREFIX,
    TEMPLATE_BUILD_SUBJECT,
    TEMPLATE_STATUS_PREFIX,
    USAGE_SUBJECT,
)
from schemas import (
    ConnectGrant,
    ConnectRefusal,
    ConnectRequest,
    DestroyRequest,
    ExtendRequest,
    LedgerCheckpoint,
    LedgerEntry,
    MeterEvent,
    ProvisionRequest,
    SandboxStatus,
    TemplateBuildRequest,
    TemplateEvent,
    UsageRecord,
    meter_event_model,
)

ASYNCAPI_VERSION = "3.0.0"
_REF = "#/components/schemas/{model}"


def _header_schema(properties: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            name: {"type": "string", "description": meaning} for name, meaning in properties.items()
        },
    }


#: Headers any message may carry when traces are on (W3C trace context).
_TRACE = {"traceparent": "W3C trace context (only when traces are on)", "tracestate": "W3C"}
_CLOUDEVENT = {
    "ce-specversion": "1.0",
    "ce-id": "deterministic: the event_id / record_id",
    "ce-source": "/sandboxer/<deployment>/<extension_id or billing>",
    "ce-type": "dev.sandboxer.sandbox.started|stopped, dev.sandboxer.usage.recorded",
    "ce-subject": "the tenant",
    "ce-time": "RFC 3339: started_at or stopped_at",
    "ce-datacontenttype": "application/json",
}
_DEDUP = {"Nats-Msg-Id": "the message's deterministic id (JetStream deduplicates on it)"}
_REQUEST = {
    **_TRACE,
    H_REPLAY: "set by `sandboxer replay`: <stream>/<seq> of the original",
    H_RETRY: "set by `sandboxer dlq retry`",
}


def _message(
    name: str, payload: dict[str, Any], summary: str, headers: dict[str, str]
) -> dict[str, Any]:
    return {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "headers": _header_schema(headers),
        "payload": payload,
    }


def _channel(
    address: str, summary: str, messages: list[str], parameters: Mapping[str, str] | None = None
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "summary": summary,
        "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
    }
    if parameters:
        channel["parameters"] = {
            name: {"description": meaning} for name, meaning in parameters.items()
        }
    return channel


def _operation(
    action: str, channel: str, summary: str, messages: list[str] | None = None
) -> dict[str, Any]:
    names = messages or []
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "summary": summary,
        "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"} for name in names],
    }


def asyncapi_document(
    meter_fields: Mapping[str, type[BaseModel]], version: str = "1"
) -> dict[str, Any]:
    """The AsyncAPI 3 document of the installed extensions (extension id -> its
    adapter's `MeterFields`)."""
    models: list[tuple[type[BaseModel], Any]] = [
        (m, "validation")
        for m in (
            ProvisionRequest,
            DestroyRequest,
            ExtendRequest,
            SandboxStatus,
            MeterEvent,
            UsageRecord,
            ConnectRequest,
            ConnectGrant,
            ConnectRefusal,
        )
    ]
    models.append((LedgerEntry, "validation"))
    models.append((LedgerCheckpoint, "validation"))
    models += [(TemplateBuildRequest, "validation"), (TemplateEvent, "validation")]
    per_extension = {
        ext: meter_event_model(ext, fields) for ext, fields in sorted(meter_fields.items())
    }
    models += [(model, "validation") for model in per_extension.values()]
    keys, top = models_json_schema(models, ref_template=_REF)
    schemas = dict(top.get("$defs", {}))

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        return keys[(model, "validation")]

    meter_names = [f"MeterEvent.{ext}" for ext in per_extension]
    messages = {
        "ProvisionRequest": _message(
            "ProvisionRequest", ref(ProvisionRequest), "Ask for a sandbox.", _REQUEST
        ),
        "DestroyRequest": _message(
            "DestroyRequest", ref(DestroyRequest), "Destroy a sandbox (idempotent).", _REQUEST
        ),
        "ExtendRequest": _message(
            "ExtendRequest",
            ref(ExtendRequest),
            "Give a ready sandbox a longer life (the hold grows first; idempotent).",
            _REQUEST,
        ),
        "ConnectRequest": _message(
            "ConnectRequest",
            ref(ConnectRequest),
            "Ask for a ready sandbox's credentials (a core-NATS request: never stored).",
            {},
        ),
        "ConnectGrant": _message(
            "ConnectGrant",
            ref(ConnectGrant),
            "The credentials, on the asker's own inbox only (never stored, never logged).",
            {},
        ),
        "ConnectRefusal": _message(
            "ConnectRefusal", ref(ConnectRefusal), "No credentials, and why.", {}
        ),
        "ScheduledDestroy": _message(
            "ScheduledDestroy",
            ref(DestroyRequest),
            "The TTL destroy, held by the server until expires_at (a message schedule).",
            {
                "Nats-Schedule": "@at <RFC 3339>",
                "Nats-Schedule-Target": DESTROY_SUBJECT,
                **_TRACE,
            },
        ),
        "SandboxStatus": _message(
            "SandboxStatus", ref(SandboxStatus), "Every state change of a sandbox.", {}
        ),
        "MeterEvent": _message(
            "MeterEvent",
            ref(MeterEvent),
            "A sandbox started or stopped (common fields; each extension adds its own).",
            {**_DEDUP, **_CLOUDEVENT, **_TRACE},
        ),
        **{
            name: _message(
                name,
                ref(per_extension[name.removeprefix("MeterEvent.")]),
                f"The exact meter event of {name.removeprefix('MeterEvent.')}.",
                {**_DEDUP, **_CLOUDEVENT, **_TRACE},
            )
            for name in meter_names
        },
        "UsageRecord": _message(
            "UsageRecord",
            ref(UsageRecord),
            "What one destroyed sandbox cost; POSTed to fin-hub.",
            {**_DEDUP, **_CLOUDEVENT, **_TRACE},
        ),
        "LedgerEntry": _message(
            "LedgerEntry", ref(LedgerEntry), "One entry of a tenant's credit journal.", _DEDUP
        ),
        "LedgerCheckpoint": _message(
            "LedgerCheckpoint",
            ref(LedgerCheckpoint),
            "A tenant's folded journal at one entry: where a cold read starts.",
            _DEDUP,
        ),
        "TemplateBuildRequest": _message(
            "TemplateBuildRequest",
            ref(TemplateBuildRequest),
            "Build a logical template with Packer and register it on its providers.",
            {},
        ),
        "TemplateEvent": _message(
            "TemplateEvent",
            ref(TemplateEvent),
            "A step of a template build; the last (`done`) carries the catalogue's record.",
            {},
        ),
        "DeadLetter": _message(
            "DeadLetter",
            {"description": "The original message's body, unchanged (cut at the size limit)."},
            "A message a consumer gave up on, with why.",
            {
                H_REASON: "why it was given up",
                H_STREAM: "the stream it came from",
                H_SEQ: "its sequence there",
                H_CONSUMER: "the consumer that gave up",
                H_DELIVERIES: "how often it was delivered",
            },
        ),
    }
    consumer = {"consumer": "an upstream consumer's name (extensions/consumer.<name>.yaml)"}
    channels = {
        "provision": _channel(
            PROVISION_SUBJECT, "Provisions from trusted publishers.", ["ProvisionRequest"]
        ),
        "provisionOfConsumer": _channel(
            f"{PROVISION_SUBJECT}.{{consumer}}",
            "Provisions from one upstream consumer (only it may publish here).",
            ["ProvisionRequest"],
            consumer,
        ),
        "destroy": _channel(
            DESTROY_SUBJECT,
            "Destroys from trusted publishers and the TTL schedule.",
            ["DestroyRequest"],
        ),
        "destroyOfConsumer": _channel(
            f"{DESTROY_SUBJECT}.{{consumer}}",
            "Destroys from one upstream consumer.",
            ["DestroyRequest"],
            consumer,
        ),
        "extend": _channel(
            EXTEND_SUBJECT, "TTL extensions from trusted publishers.", ["ExtendRequest"]
        ),
        "extendOfConsumer": _channel(
            f"{EXTEND_SUBJECT}.{{consumer}}",
            "TTL extensions from one upstream consumer.",
            ["ExtendRequest"],
            consumer,
        ),
        "connect": _channel(
            f"{CONNECT_SUBJECT_PREFIX}.{{owner}}.{{sandbox_id}}",
            "Core NATS, no stream: the owner asks for a sandbox's credentials (only its "
            "identity may publish under its name; docs/reachability.md).",
            ["ConnectRequest"],
            {"owner": "the owning consumer, or `default`", "sandbox_id": "the sandbox"},
        ),
        "connectReply": {
            "address": None,
            "summary": "The asker's own inbox (`_INBOX.<identity>.>`), which only it reads.",
            "messages": {
                name: {"$ref": f"#/components/messages/{name}"}
                for name in ("ConnectGrant", "ConnectRefusal")
            },
        },
        "schedule": _channel(
            f"{SCHEDULE_SUBJECT_PREFIX}.{{sandbox_id}}",
            "TTL destroys waiting for their time (internal).",
            ["ScheduledDestroy"],
            {"sandbox_id": "the sandbox"},
        ),
        "status": _channel(
            f"{STATUS_SUBJECT_PREFIX}.{{owner}}.{{sandbox_id}}",
            "A sandbox's statuses, under the consumer that owns its tenant (`default`).",
            ["SandboxStatus"],
            {"owner": "the owning consumer, or `default`", "sandbox_id": "the sandbox"},
        ),
        "meter": _channel(
            f"{METER_SUBJECT_PREFIX}.{{extension_id}}",
            "Meter events; also CloudEvents 1.0 in binary mode (ce-* headers).",
            ["MeterEvent", *meter_names],
            {"extension_id": "the extension that made the sandbox, e.g. ext.e2b"},
        ),
        "usage": _channel(
            USAGE_SUBJECT,
            "One usage record per destroyed sandbox; also a CloudEvent.",
            ["UsageRecord"],
        ),
        "ledger": _channel(
            f"{LEDGER_SUBJECT_PREFIX}.{{tenant}}.{{kind}}.{{entry_id}}",
            "The credit journal (grant, hold, release, debit).",
            ["LedgerEntry"],
            {"tenant": "the tenant", "kind": "the entry's kind", "entry_id": "its id"},
        ),
        "checkpoint": _channel(
            f"{CHECKPOINT_SUBJECT_PREFIX}.{{tenant}}",
            "Checkpoints of a tenant's journal, the whole chain kept (docs/payments.md).",
            ["LedgerCheckpoint"],
            {"tenant": "the tenant (or an account's `~` journal)"},
        ),
        "templateBuild": _channel(
            TEMPLATE_BUILD_SUBJECT,
            "Template builds, from operators only (docs/templates.md).",
            ["TemplateBuildRequest"],
        ),
        "templateStatus": _channel(
            f"{TEMPLATE_STATUS_PREFIX}.{{name}}",
            "A template's build progress.",
            ["TemplateEvent"],
            {"name": "the logical template"},
        ),
        "deadLetters": _channel(
            f"{DLQ_SUBJECT_PREFIX}.{{consumer}}",
            "Dead letters, by the consumer that gave up (`sandboxer dlq`).",
            ["DeadLetter"],
            {"consumer": "the durable consumer, e.g. provisioner-provision"},
        ),
    }
    operations = {
        "receiveProvision": _operation(
            "receive", "provision", "The provisioner takes provisions.", ["ProvisionRequest"]
        ),
        "receiveProvisionOfConsumer": _operation(
            "receive", "provisionOfConsumer", "The same, per consumer.", ["ProvisionRequest"]
        ),
        "receiveDestroy": _operation(
            "receive", "destroy", "The provisioner takes destroys.", ["DestroyRequest"]
        ),
        "receiveDestroyOfConsumer": _operation(
            "receive", "destroyOfConsumer", "The same, per consumer.", ["DestroyRequest"]
        ),
        "receiveExtend": _operation(
            "receive", "extend", "The provisioner takes TTL extensions.", ["ExtendRequest"]
        ),
        "receiveExtendOfConsumer": _operation(
            "receive", "extendOfConsumer", "The same, per consumer.", ["ExtendRequest"]
        ),
        "receiveConnect": {
            **_operation(
                "receive", "connect", "Any worker answers a connect request.", ["ConnectRequest"]
            ),
            "reply": {
                "channel": {"$ref": "#/channels/connectReply"},
                "messages": [
                    {"$ref": f"#/channels/connectReply/messages/{name}"}
                    for name in ("ConnectGrant", "ConnectRefusal")
                ],
            },
        },
        "sendSchedule": _operation(
            "send", "schedule", "The provisioner schedules each TTL destroy.", ["ScheduledDestroy"]
        ),
        "sendStatus": _operation(
            "send", "status", "The provisioner announces every state change.", ["SandboxStatus"]
        ),
        "sendMeter": _operation(
            "send",
            "meter",
            "The provisioner meters starts and stops.",
            ["MeterEvent", *meter_names],
        ),
        "receiveMeter": _operation(
            "receive", "meter", "Billing debits stopped sandboxes once.", ["MeterEvent"]
        ),
        "sendUsage": _operation("send", "usage", "Billing publishes usage.", ["UsageRecord"]),
        "receiveUsage": _operation(
            "receive", "usage", "The exporter POSTs each record to fin-hub.", ["UsageRecord"]
        ),
        "sendLedger": _operation(
            "send", "ledger", "Workers hold and release, billing debits.", ["LedgerEntry"]
        ),
        "sendCheckpoint": _operation(
            "send",
            "checkpoint",
            "Workers and billing checkpoint every 1,000 entries they fold.",
            ["LedgerCheckpoint"],
        ),
        "receiveTemplateBuild": _operation(
            "receive",
            "templateBuild",
            "The template worker builds and registers.",
            ["TemplateBuildRequest"],
        ),
        "sendTemplateStatus": _operation(
            "send", "templateStatus", "The template worker tells each step.", ["TemplateEvent"]
        ),
        "sendDeadLetter": _operation(
            "send", "deadLetters", "Every consumer keeps what it gives up on.", ["DeadLetter"]
        ),
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "sandboxer",
            "version": version,
            "description": "Event-driven sandbox broker on NATS JetStream. Every subject "
            "but `sandbox.connect.>` (core NATS request/reply: its replies carry "
            "credentials) is persisted in JetStream; payloads are JSON, money is a "
            "decimal string.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "nats": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "Any NATS server with JetStream (2.12 or later).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }
