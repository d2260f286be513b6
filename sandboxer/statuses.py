"""SandboxStatus in the `sandboxer-status` bucket. Creating the key claims the
(tenant, request_id) pair; updates are compare-and-set on the revision, so two workers
handling the same request can never both move a sandbox forward."""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sandboxer.topology import STATUS_BUCKET, kv_entries, status_subject
from schemas import SandboxStatus


class StaleStatus(Exception):
    """Someone else changed the status since it was read."""


class StatusStore:
    """Reads and writes SandboxStatus; every stored write is also announced by the
    bucket's republish on `sandbox.status.<id>`."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> StatusStore:
        return cls(js, await js.key_value(STATUS_BUCKET))

    async def get(self, sandbox_id: str) -> tuple[SandboxStatus, int] | None:
        """The status and its revision, or None if the sandbox was never claimed."""
        try:
            entry = await self._kv.get(sandbox_id)
        except KeyNotFoundError:
            return None
        return SandboxStatus.model_validate_json(entry.value or b""), entry.revision or 0

    async def create(self, status: SandboxStatus) -> int | None:
        """Store a first status; None if the sandbox already has one (the claim is taken)."""
        try:
            return await self._kv.create(status.sandbox_id, status.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return None

    async def update(self, status: SandboxStatus, revision: int) -> int:
        """Replace the status read at `revision`; `StaleStatus` if it moved since."""
        try:
            return await self._kv.update(
                status.sandbox_id, status.model_dump_json().encode(), last=revision
            )
        except KeyWrongLastSequenceError:
            raise StaleStatus(status.sandbox_id) from None

    async def announce(self, status: SandboxStatus) -> None:
        """Publish a status without storing it: an answer to a request that must not
        overwrite the sandbox's own state (a conflict, an unknown id)."""
        await self._js.publish(status_subject(status.sandbox_id), status.model_dump_json().encode())

    async def all(self) -> AsyncIterator[SandboxStatus]:
        """Every stored status, in bucket order."""
        async for _key, value in kv_entries(self._js, STATUS_BUCKET):
            yield SandboxStatus.model_validate_json(value)
