"""What the provision and destroy paths share: the router to the adapters, the
keep-alive of long provider calls, the meter events, and each sandbox's TTL destroy,
held by nats-server until `expires_at` (`Expiry`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext

from adapters.registry import Registry
from adapters.routing import Router
from consumers.delivery import KeepAlive
from consumers.metering import Metering
from sandboxer import observe
from sandboxer.ids import ttl_destroy_request_id
from sandboxer.settings import Settings
from sandboxer.topology import DESTROY_SUBJECT, REQUESTS_STREAM, schedule_subject
from schemas import DestroyRequest, SandboxStatus


def _schedule_at(moment: datetime) -> str:
    """`@at` time of a schedule, rounded up to the second: never fire before `moment`."""
    utc = moment.astimezone(UTC)
    if utc.microsecond:
        utc = utc.replace(microsecond=0) + timedelta(seconds=1)
    return f"@at {utc.strftime('%Y-%m-%dT%H:%M:%SZ')}"


class Expiry:
    """Each sandbox's TTL destroy, held by nats-server until `expires_at` (a message
    schedule on `sandbox.schedule.<sandbox_id>` that fires onto `sandbox.destroy`)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    @staticmethod
    def request(status: SandboxStatus) -> DestroyRequest:
        """The TTL destroy of a sandbox: always the same request id, so it is one
        request however often it is sent."""
        return DestroyRequest(
            request_id=ttl_destroy_request_id(status.sandbox_id),
            tenant=status.tenant,
            sandbox_id=status.sandbox_id,
            reason="ttl",
        )

    async def schedule(self, status: SandboxStatus) -> None:
        """Have the server send the TTL destroy at `expires_at` (publishing it again
        replaces the schedule)."""
        assert status.expires_at is not None
        await self._js.publish(
            schedule_subject(status.sandbox_id),
            self.request(status).model_dump_json().encode(),
            headers=observe.trace_headers(
                {
                    "Nats-Schedule": _schedule_at(status.expires_at),
                    "Nats-Schedule-Target": DESTROY_SUBJECT,
                }
            ),
        )

    async def send_now(self, status: SandboxStatus) -> None:
        """The TTL destroy, right away (reconciliation of an expired sandbox)."""
        request = self.request(status).model_dump_json().encode()
        await self._js.publish(DESTROY_SUBJECT, request, headers=observe.trace_headers())

    async def cancel(self, sandbox_id: str) -> None:
        """Drop the schedule (the sandbox is gone); if it fires anyway it is a no-op."""
        await self._js.purge_stream(REQUESTS_STREAM, subject=schedule_subject(sandbox_id))


@dataclass(frozen=True)
class Lifecycle:
    """The parts a sandbox's way from request to destroy goes through."""

    settings: Settings
    registry: Registry
    router: Router
    keepalive: KeepAlive
    metering: Metering
    expiry: Expiry
