"""A small client of the service, over plain NATS: what the CLI, the tests and the
benchmark use, and a model for publishers in other languages.

As an upstream consumer (`consumer="acme"`) it publishes on `sandbox.provision.acme`
and `sandbox.destroy.acme` and reads statuses under `sandbox.status.acme.>`, all an
upstream identity may do. Without one it is a trusted publisher (the plain subjects)
that reads every status: an operator's, or the zero-config default's."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from nats.aio.client import Client as Nats
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from pydantic import ValidationError

from sandboxer import observe
from sandboxer.connect import connect_nats
from sandboxer.ids import sandbox_id_for
from sandboxer.settings import NatsAuth, servers_of
from sandboxer.statuses import StatusStore, last_status
from sandboxer.topology import (
    connect_subject,
    destroy_subject,
    extend_subject,
    provision_subject,
    status_key,
    status_subject,
)
from schemas import (
    ConnectGrant,
    ConnectRefusal,
    ConnectRequest,
    DestroyRequest,
    ErrorInfo,
    ExtendRequest,
    ProvisionRequest,
    SandboxState,
    SandboxStatus,
)

PROVISION_SETTLED = frozenset(
    {SandboxState.READY, SandboxState.FAILED, SandboxState.DESTROYING, SandboxState.DESTROYED}
)
DESTROY_SETTLED = frozenset({SandboxState.DESTROYED, SandboxState.FAILED})


#: How often a long wait says it is still waiting.
PROGRESS_EVERY_S = 10.0

#: Told of a wait's progress: the sandbox, its last status (None: none yet), seconds.
Progress = Callable[[str, SandboxStatus | None, float], None]


class WaitTimedOut(Exception):
    """No settled answer came within the wait; the request was sent all the same."""

    def __init__(self, sandbox_id: str, waited_s: float, last: SandboxStatus | None) -> None:
        state = last.state.value if last else "not claimed yet"
        super().__init__(f"no answer within {waited_s:g} s; {sandbox_id} is {state}")
        self.sandbox_id = sandbox_id
        self.last = last


class ConnectRefused(Exception):
    """A connect request was answered without credentials: `error` says why."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(f"{error.code.value}: {error.message}")
        self.error = error


#: How long a connect request waits for its answer (a provider call is in it).
CONNECT_TIMEOUT_S = 30.0


class Client:
    """`async with Client(url) as client: await client.provision(request, wait_s=30)`."""

    def __init__(
        self,
        url: str,
        *,
        reconnect: bool = False,
        auth: NatsAuth | None = None,
        consumer: str | None = None,
        progress: Progress | None = None,
    ) -> None:
        """`url` may list several servers, comma-separated; `auth` is the identity to
        connect as, `consumer` the upstream it publishes for; `progress` hears how a
        wait goes. A CLI client fails fast (`reconnect=False`); a long-lived one may
        ride over a server restart."""
        self.url = url
        self.consumer = consumer
        self._progress = progress
        self._reconnect = reconnect
        self._auth = auth or NatsAuth()
        self._nc: Nats | None = None
        self._js: JetStreamContext | None = None

    async def __aenter__(self) -> Client:
        self._nc = await connect_nats(
            servers_of(self.url),
            self._auth,
            "sandboxer-client",
            reconnect=self._reconnect,
            reconnect_wait_s=0.2,
            quiet=True,
        )
        self._js = self._nc.jetstream(timeout=10.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            await self._nc.close()

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None, "use `async with Client(...)`"
        return self._js

    async def provision(
        self, request: ProvisionRequest, *, wait_s: float | None = None
    ) -> SandboxStatus | None:
        """Publish a ProvisionRequest; with `wait_s`, return its settled status."""
        sandbox_id = sandbox_id_for(request.tenant, request.request_id)
        return await self._request(
            provision_subject(self.consumer),
            request.model_dump_json().encode(),
            sandbox_id,
            PROVISION_SETTLED,
            wait_s,
        )

    async def destroy(
        self, request: DestroyRequest, *, wait_s: float | None = None
    ) -> SandboxStatus | None:
        """Publish a DestroyRequest; with `wait_s`, return the sandbox's final status."""
        return await self._request(
            destroy_subject(self.consumer),
            request.model_dump_json().encode(),
            request.sandbox_id,
            DESTROY_SETTLED,
            wait_s,
        )

    async def extend(
        self, request: ExtendRequest, *, wait_s: float | None = None
    ) -> SandboxStatus | None:
        """Publish an ExtendRequest; with `wait_s`, return the status that answers it
        (the sandbox with its new `expires_at`, or a refusal)."""
        assert self._nc is not None
        return await self._request(
            extend_subject(self.consumer),
            request.model_dump_json().encode(),
            request.sandbox_id,
            frozenset(SandboxState),
            wait_s,
            answered=lambda s: (
                s.error is not None
                or any(x.request_id == request.request_id for x in s.ttl_extensions)
            ),
        )

    async def connect(
        self, sandbox_id: str, tenant: str, owner: str | None = None, port: int | None = None
    ) -> ConnectGrant:
        """The credentials of a ready sandbox, asked for on its owner's connect subject
        (an upstream's own; a trusted client names the `owner` from the status)."""
        assert self._nc is not None
        who = self.consumer or owner
        if who is None:
            raise ValueError("connect needs the sandbox's owner")
        answer = await self._nc.request(
            connect_subject(who, sandbox_id),
            ConnectRequest(tenant=tenant, port=port).model_dump_json().encode(),
            timeout=CONNECT_TIMEOUT_S,
        )
        try:
            return ConnectGrant.model_validate_json(answer.data)
        except ValidationError:
            raise ConnectRefused(ConnectRefusal.model_validate_json(answer.data).error) from None

    async def status(self, sandbox_id: str) -> SandboxStatus | None:
        """The stored status of a sandbox, or None. A consumer reads its own with a
        direct get of its key, the only read its permissions allow."""
        assert self._nc is not None
        found = await last_status(self._nc, status_key(self.consumer or "*", sandbox_id))
        return found[0] if found else None

    async def statuses(self) -> list[SandboxStatus]:
        """Every stored status."""
        store = await StatusStore.open(self.js)
        return [status async for status in store.all()]

    async def _request(
        self,
        subject: str,
        payload: bytes,
        sandbox_id: str,
        settled: frozenset[SandboxState],
        wait_s: float | None,
        answered: Callable[[SandboxStatus], bool] | None = None,
    ) -> SandboxStatus | None:
        if wait_s is None:
            await self.js.publish(subject, payload, headers=observe.trace_headers())
            return None
        assert self._nc is not None
        # Subscribe before publishing, so no answer can slip by. A trusted publisher
        # does not know which consumer owns the tenant: any owner's subject will do.
        answers = await self._nc.subscribe(status_subject(self.consumer or "*", sandbox_id))
        loop = asyncio.get_running_loop()
        began = loop.time()
        last: SandboxStatus | None = None
        try:
            await self.js.publish(subject, payload, headers=observe.trace_headers())
            while True:
                left = began + wait_s - loop.time()
                if left <= 0:
                    raise WaitTimedOut(sandbox_id, wait_s, last)
                try:
                    message = await answers.next_msg(timeout=min(left, PROGRESS_EVERY_S))
                except NatsTimeout:
                    if self._progress is not None and left > PROGRESS_EVERY_S:
                        self._progress(sandbox_id, last, loop.time() - began)
                    continue
                status = SandboxStatus.model_validate_json(message.data)
                if self._progress is not None and (last is None or status.state != last.state):
                    self._progress(sandbox_id, status, loop.time() - began)
                last = status
                if status.state in settled and (answered is None or answered(status)):
                    return status
        finally:
            await answers.unsubscribe()
