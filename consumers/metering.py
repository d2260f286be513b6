"""Meter events: a sandbox's `started` and `stopped` events on
`sandbox.meter.<extension_id>`, each validated against its extension's exact event
model and published with its deterministic id as `Nats-Msg-Id`, *before* the status
change it announces, so a crash in between repeats the event (deduplicated), never
loses it."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from nats.js import JetStreamContext
from pydantic_core import to_jsonable_python

from adapters.base import ProviderSandbox, Usage
from adapters.registry import Registry
from sandboxer import observe
from sandboxer.statuses import StaleStatus, StatusStore
from sandboxer.topology import meter_subject
from schemas import (
    ControlEndpoint,
    Endpoint,
    MeterKind,
    SandboxState,
    SandboxStatus,
    meter_event_id,
    utcnow,
)
from schemas.cloudevents import meter_event_headers

log = logging.getLogger("sandboxer.metering")


def recorded_sandbox(status: SandboxStatus) -> ProviderSandbox:
    """The provider sandbox a status records, as the adapter reported it at start.
    (Statuses written before `started_at` was recorded fall back to `ready_at`.)"""
    assert status.provider_sandbox_id is not None
    started_at = status.started_at or status.ready_at or status.created_at
    return ProviderSandbox(
        provider_sandbox_id=status.provider_sandbox_id,
        tags={},
        running=status.state is SandboxState.READY,
        started_at=started_at,
        meter_fields=status.meter_fields or {},
    )


def reach_fields(
    endpoints: Sequence[Endpoint] | None, control: ControlEndpoint | None, status: SandboxStatus
) -> dict[str, Any]:
    """What a status says of how its sandbox is reached: the endpoints and the control
    API, each credential said to expire with the sandbox (`status.expires_at`)."""
    expires = status.expires_at

    def expiring(item: Any) -> Any:
        return (
            item.model_copy(update={"credential_expires_at": expires})
            if item.auth != "none"
            else item
        )

    return {
        "endpoints": None if endpoints is None else [expiring(e) for e in endpoints],
        "control": None if control is None else expiring(control),
    }


class Metering:
    """Publishes meter events, and records the state changes they announce."""

    def __init__(
        self, js: JetStreamContext, registry: Registry, statuses: StatusStore, deployment: str
    ) -> None:
        self._js = js
        self._deployment = deployment
        self._registry = registry
        self._statuses = statuses

    async def mark_ready(
        self, status: SandboxStatus, revision: int, sandbox: ProviderSandbox
    ) -> bool:
        """Record a ready provider sandbox on its claim: the `started` event first, then
        the status. False if another delivery (or reconciliation) got there first."""
        ready = status.with_changes(
            state=SandboxState.READY,
            provider_sandbox_id=sandbox.provider_sandbox_id,
            ready_at=utcnow(),
            started_at=sandbox.started_at,
            meter_fields=to_jsonable_python(sandbox.meter_fields),
            **reach_fields(sandbox.endpoints if sandbox.ports else None, sandbox.control, status),
        )
        await self.publish(ready, "started")
        try:
            await self._statuses.update(ready, revision)
        except StaleStatus:
            log.info("provision %s: settled concurrently by another delivery", status.sandbox_id)
            return False
        return True

    async def publish(
        self, status: SandboxStatus, kind: MeterKind, usage: Usage | None = None
    ) -> None:
        """The sandbox's `kind` event: on `stopped`, with what `usage` says it cost."""
        assert status.extension_id is not None
        fields: Mapping[str, Any] = usage.meter_fields if usage else status.meter_fields or {}
        model = self._registry.meter_event_model(status.extension_id)
        event = model.model_validate(
            {
                **fields,
                "event_id": meter_event_id(status.sandbox_id, kind),
                "kind": kind,
                "extension_id": status.extension_id,
                "sandbox_id": status.sandbox_id,
                "tenant": status.tenant,
                "profile": status.profile,
                "provider_sandbox_id": status.provider_sandbox_id,
                "credential_source": status.credential_source,
                "started_at": usage.started_at if usage else status.started_at,
                "stopped_at": usage.stopped_at if usage else None,
                "duration_s": usage.duration_s if usage else None,
                "estimate_usd": status.estimate_usd,
                "actual_usd": usage.actual_usd if usage else None,
            }
        )
        await self._js.publish(
            meter_subject(status.extension_id),
            event.model_dump_json().encode(),
            headers=observe.trace_headers(
                {"Nats-Msg-Id": event.event_id, **meter_event_headers(event, self._deployment)}
            ),
        )
