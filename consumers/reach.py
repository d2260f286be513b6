"""Handing out a sandbox's credentials: core-NATS requests on
`sandbox.connect.<owner>.<sandbox_id>`, answered by any worker (queue group).

Only the owner's identity may publish under its name (nats-server), so the subject says
who asks; the status must be stored under that owner, for the tenant the request
names, and ready. The adapter fetches the tokens from the provider (E2B) or mints one
for the asker (Modal); the reply goes to the asker's own inbox, which no one else may
read, and nothing of it is stored, logged or put into an error (docs/reachability.md).
"""

from __future__ import annotations

import asyncio
import logging

from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import ValidationError

from adapters.base import Reach
from adapters.routing import Router
from sandboxer import observe
from sandboxer.errors import InvalidRequest, NotFound, SandboxerError, error_info
from sandboxer.statuses import StatusStore
from sandboxer.topology import CONNECT_QUEUE, CONNECT_SUBJECT_PREFIX
from schemas import (
    ConnectGrant,
    ConnectRefusal,
    ConnectRequest,
    ErrorCode,
    ErrorInfo,
    SandboxState,
    SandboxStatus,
)

log = logging.getLogger("sandboxer.reach")

#: Connect requests answered at once by one worker; more wait their turn.
MAX_CONNECTS_IN_FLIGHT = 64


class Connecting:
    """Answers connect requests."""

    def __init__(self, router: Router, statuses: StatusStore) -> None:
        self._router = router
        self._statuses = statuses
        self._slots = asyncio.Semaphore(MAX_CONNECTS_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()

    async def subscribe(self, nc: Nats) -> Subscription:
        """Take this worker's share of connect requests."""
        return await nc.subscribe(
            f"{CONNECT_SUBJECT_PREFIX}.*.*", queue=CONNECT_QUEUE, cb=self._on_message
        )

    async def _on_message(self, message: Msg) -> None:
        # nats-py runs one callback at a time per subscription: a slow provider must
        # not hold the others, so each request is its own task.
        task = asyncio.create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Let the requests being answered finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=10)

    async def _answer(self, message: Msg) -> None:
        if not message.reply:
            return  # nobody to answer: a publish, not a request
        async with self._slots:
            try:
                reply = await self.grant(message.subject, message.data)
            except SandboxerError as exc:
                reply = ConnectRefusal(error=error_info(exc)).model_dump_json().encode()
            except Exception:
                log.exception("connect %s: unexpected error", message.subject)
                internal = ErrorInfo(code=ErrorCode.INTERNAL, message="internal error")
                reply = ConnectRefusal(error=internal).model_dump_json().encode()
        try:
            await message.respond(reply)
        except Exception as exc:  # the asker is gone, or the connection is
            log.warning("connect %s: reply not sent: %s", message.subject, type(exc).__name__)

    async def grant(self, subject: str, data: bytes) -> bytes:
        """The JSON ConnectGrant for a request on `subject`; raises what to refuse with."""
        owner, sandbox_id = _owner_and_sandbox(subject)
        try:
            request = ConnectRequest.model_validate_json(data)
        except ValidationError as exc:
            raise InvalidRequest(f"not a ConnectRequest: {exc.error_count()} problems") from None
        status = await self._ready_status(owner, sandbox_id, request.tenant)
        assert status.extension_id is not None and status.provider_sandbox_id is not None
        assert status.expires_at is not None
        if request.port is not None and not any(
            e.port == request.port for e in status.endpoints or []
        ):
            raise InvalidRequest(f"{sandbox_id} serves no port {request.port}")
        reach = Reach(
            sandbox_id=sandbox_id,
            tenant=status.tenant,
            requester=owner,
            provider_sandbox_id=status.provider_sandbox_id,
            endpoints=tuple(status.endpoints or ()),
            control=status.control,
            expires_at=status.expires_at,
            port=request.port,
        )
        credentials = await self._router.credentials(status)
        with observe.provider_call(status.extension_id, "connect"):
            granted = await self._router.adapter(status.extension_id).connect(reach, credentials)
        log.info("connect %s: credentials handed to %s", sandbox_id, owner)
        return (
            ConnectGrant(
                sandbox_id=sandbox_id,
                credentials=granted.credentials,
                control=granted.control,
                control_sdk=dict(granted.control_sdk),
            )
            .model_dump_json()
            .encode()
        )

    async def _ready_status(self, owner: str, sandbox_id: str, tenant: str) -> SandboxStatus:
        """The ready sandbox `owner` asks about, for `tenant`; another's, or one that is
        not there, is `not_found` alike."""
        found = await self._statuses.get(owner, sandbox_id)
        if found is None or found[0].tenant != tenant:
            raise NotFound(f"no sandbox {sandbox_id}")
        status = found[0]
        if status.state is not SandboxState.READY:
            raise InvalidRequest(f"{sandbox_id} is {status.state.value}, not ready")
        return status


def _owner_and_sandbox(subject: str) -> tuple[str, str]:
    tokens = subject.split(".")
    if len(tokens) != 4 or not tokens[3].startswith("sbx-"):
        raise InvalidRequest(f"not a connect subject: {subject[:120]}")
    return tokens[2], tokens[3]
