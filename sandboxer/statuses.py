"""SandboxStatus in the `sandboxer-status` bucket, keyed `<owner>.<sandbox_id>` (the owner
is the consumer whose tenant it is: only it may read there). Creating the key claims the
(tenant, request_id) pair; updates are compare-and-set on the revision, so two workers
handling the same request can never both move a sandbox forward."""

from __future__ import annotations

from collections.abc import AsyncIterator

from nats.aio.client import Client as Nats
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from sandboxer import observe
from sandboxer.connect import connection_of
from sandboxer.topology import STATUS_BUCKET, kv_entries, status_key, status_subject
from schemas import SandboxState, SandboxStatus


class StaleStatus(Exception):
    """Someone else changed the status since it was read."""


class StatusStore:
    """Reads and writes SandboxStatus under `<owner>.<sandbox_id>`; every stored write is
    also announced by the bucket's republish on `sandbox.status.<owner>.<sandbox_id>`."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self._js = js
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> StatusStore:
        return cls(js, await js.key_value(STATUS_BUCKET))

    async def get(self, owner: str, sandbox_id: str) -> tuple[SandboxStatus, int] | None:
        """The status and its revision, or None if the sandbox was never claimed under
        `owner`."""
        try:
            entry = await self._kv.get(status_key(owner, sandbox_id))
        except KeyNotFoundError:
            return None
        return SandboxStatus.model_validate_json(entry.value or b""), entry.revision or 0

    async def locate(self, owner: str, sandbox_id: str) -> tuple[SandboxStatus, int] | None:
        """The status under `owner`, else under whichever owner has it (its tenant moved
        to another consumer since it was claimed); None if nobody has it."""
        return await self.get(owner, sandbox_id) or await self.find(sandbox_id)

    async def find(self, sandbox_id: str) -> tuple[SandboxStatus, int] | None:
        """The status of a sandbox whatever its owner (for operators), or None: one
        direct get of the last message on `$KV.sandboxer-status.*.<sandbox_id>`."""
        found = await last_status(connection_of(self._js), status_key("*", sandbox_id))
        return found

    async def create(self, status: SandboxStatus) -> int | None:
        """Store a first status; None if the sandbox already has one (the claim is taken)."""
        try:
            revision = await self._kv.create(_key(status), status.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            return None
        _count(status)
        return revision

    async def update(self, status: SandboxStatus, revision: int) -> int:
        """Replace the status read at `revision`; `StaleStatus` if it moved since."""
        try:
            stored = await self._kv.update(
                _key(status), status.model_dump_json().encode(), last=revision
            )
        except KeyWrongLastSequenceError:
            raise StaleStatus(status.sandbox_id) from None
        _count(status)
        return stored

    async def announce(self, status: SandboxStatus) -> None:
        """Publish a status without storing it: an answer to a request that must not
        overwrite the sandbox's own state (a conflict, an unknown id, a refusal), on the
        subject of `status.owner`."""
        await self._js.publish(
            status_subject(status.owner, status.sandbox_id), status.model_dump_json().encode()
        )

    async def all(self) -> AsyncIterator[SandboxStatus]:
        """Every stored status, in bucket order."""
        async for _, value in kv_entries(self._js, STATUS_BUCKET):
            yield SandboxStatus.model_validate_json(value)


def _count(status: SandboxStatus) -> None:
    """Count a stored change that settles a request (each is stored once: CAS)."""
    extension = status.extension_id or ""
    if status.state is SandboxState.READY:
        observe.PROVISIONS.labels(extension, "ready", "").inc()
    elif status.state is SandboxState.FAILED:
        code = status.error.code if status.error else ""
        observe.PROVISIONS.labels(extension, "failed", code).inc()
    elif status.state is SandboxState.DESTROYED:
        observe.DESTROYS.labels(extension, "destroyed", "").inc()


async def last_status(nc: Nats, key: str) -> tuple[SandboxStatus, int] | None:
    """The status stored under `key` (which may have a `*` for the owner) and its
    revision, with one direct get; None if there is none. The subject-in-the-request
    form is what an upstream's permissions allow for its own keys
    (`$JS.API.DIRECT.GET.KV_sandboxer-status.$KV.sandboxer-status.<owner>.>`)."""
    subject = f"$KV.{STATUS_BUCKET}.{key}"
    answer = await nc.request(f"$JS.API.DIRECT.GET.KV_{STATUS_BUCKET}.{subject}", b"")
    headers = answer.headers or {}
    if headers.get("Status") or headers.get("KV-Operation") in ("DEL", "PURGE"):
        return None  # 404: never stored, or deleted
    return SandboxStatus.model_validate_json(answer.data), int(headers["Nats-Sequence"])


def _key(status: SandboxStatus) -> str:
    return status_key(status.owner, status.sandbox_id)
