"""Connections to NATS: every process opens its connections here, with the same
servers, credentials, TLS and inbox prefix, so that what a connection needs is said
once (`docs/security.md`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from nats import errors as nats_errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from sandboxer.settings import NatsAuth, Settings

log = logging.getLogger("sandboxer.connect")


class LeanNats(Nats):
    """nats-py's client with a cheaper request/reply, which every JetStream publish and
    KV write is (six per provision). nats-py draws 2 bytes from `os.urandom` for each
    request's reply token and waits with `asyncio.wait_for`: together 15 % of a
    worker's CPU in the profile of (b) (docs/architecture.md). Here the token is the
    connection's NUID alone, unique per connection (it never was a secret: the reply
    inbox is the identity's own, which only it may read), and the wait is one timer.
    Same replies, same `nats.errors.TimeoutError`."""

    async def _request_new_style(
        self,
        subject: str,
        payload: bytes,
        timeout: float = 1,  # noqa: ASYNC109 (nats-py's signature)
        headers: dict[str, Any] | None = None,
    ) -> Msg:
        if self.is_draining_pubs:
            raise nats_errors.ConnectionDrainingError
        if not self._resp_sub_prefix:
            await self._init_request_sub()
        assert self._resp_sub_prefix
        token = self._nuid.next().decode()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg] = loop.create_future()
        self._resp_map[token] = future
        timer = loop.call_later(timeout, _time_out, future)
        try:
            inbox = self._resp_sub_prefix.decode() + token
            await self.publish(subject, payload, reply=inbox, headers=headers)
            return await future
        finally:
            timer.cancel()
            self._resp_map.pop(token, None)


def _time_out(future: asyncio.Future[Msg]) -> None:
    if not future.done():
        future.set_exception(nats_errors.TimeoutError())


def tls_context(auth: NatsAuth) -> ssl.SSLContext | None:
    """The TLS context of `auth` (a custom CA, a client certificate), or None."""
    if not (auth.tls_ca or auth.tls_cert):
        return None
    context = ssl.create_default_context(cafile=str(auth.tls_ca) if auth.tls_ca else None)
    if auth.tls_cert and auth.tls_key:
        context.load_cert_chain(str(auth.tls_cert), str(auth.tls_key))
    return context


def auth_options(auth: NatsAuth) -> dict[str, Any]:
    """`nats.connect` keyword arguments for `auth` (FastStream's broker takes the same,
    but TLS and user/password: see `consumers/app.py`)."""
    options: dict[str, Any] = {}
    if auth.creds_file:
        options["user_credentials"] = str(auth.creds_file)
    if auth.nkey_seed_file:
        options["nkeys_seed"] = str(auth.nkey_seed_file)
    if auth.token:
        options["token"] = auth.token
    if auth.inbox_prefix:
        options["inbox_prefix"] = auth.inbox_prefix
    return options


async def _quiet(exc: Exception) -> None:
    # nats-py prints every connection error with a traceback; the caller reports it.
    return None


#: Reconnects refused for bad credentials in a row before a connection gives up.
MAX_AUTH_REFUSALS = 5


class Refusals:
    """Counts reconnects the server refuses for bad credentials (a revoked or rotated
    key): nats-py would retry them forever, and the process would stay up, failing.
    After `MAX_AUTH_REFUSALS` in a row, `give_up` is called (the process then exits)."""

    def __init__(self, name: str, give_up: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._give_up = give_up
        self._in_a_row = 0

    async def on_error(self, exc: Exception) -> None:
        if not _is_auth_refusal(exc):
            return
        self._in_a_row += 1
        if self._in_a_row == MAX_AUTH_REFUSALS:
            log.error(
                "%s: NATS refused its credentials %d times in a row", self.name, self._in_a_row
            )
            await self._give_up()

    async def on_reconnected(self) -> None:
        self._in_a_row = 0


def _is_auth_refusal(exc: Exception) -> bool:
    text = str(exc).lower()
    return (
        "authorization violation" in text
        or "authentication" in text
        or (type(exc).__name__ == "AuthorizationError")
    )


async def connect_nats(
    servers: list[str],
    auth: NatsAuth,
    name: str,
    *,
    reconnect: bool = True,
    reconnect_wait_s: float = 2.0,
    quiet: bool = False,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_refused: Callable[[], Awaitable[None]] | None = None,
) -> Nats:
    """A connection to `servers` as the identity `auth` says. A long-lived one
    (`reconnect`) rides over a server restart or a cluster's leader election; a CLI's
    fails fast. `quiet` leaves reporting connection errors to the caller; `on_closed`
    is called once the connection is closed for good, `on_refused` once the server has
    refused its credentials `MAX_AUTH_REFUSALS` times in a row."""
    options = auth_options(auth)
    context = tls_context(auth)
    if context is not None:
        options["tls"] = context
    if auth.user:
        options["user"] = auth.user
        options["password"] = auth.password or ""
    if on_closed is not None:
        options["closed_cb"] = on_closed
    if quiet:
        options["error_cb"] = _quiet
    if reconnect:
        options.update(max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait_s)
        if on_refused is not None:
            refusals = Refusals(name, on_refused)
            options.update(error_cb=refusals.on_error, reconnected_cb=refusals.on_reconnected)
    else:
        options.update(
            connect_timeout=5,
            allow_reconnect=False,
            max_reconnect_attempts=1,  # 0 is "forever" to nats-py
        )
    nc = LeanNats()
    await nc.connect(servers, name=name, **options)
    return nc


async def connect_service(
    settings: Settings,
    name: str,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_refused: Callable[[], Awaitable[None]] | None = None,
) -> Nats:
    """The long-lived connection of a service process (`settings`' servers and identity)."""
    return await connect_nats(
        settings.nats_servers,
        settings.nats_auth,
        name,
        on_closed=on_closed,
        on_refused=on_refused,
    )


async def close_nats(nc: Nats, timeout_s: float = 10.0) -> None:
    """Drain the connection (what was published is flushed), then close it: a drain
    alone returns at once, and leaves the connection open, while it is reconnecting."""
    if not nc.is_closed:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), timeout_s)
    if not nc.is_closed:
        await nc.close()


def connection_of(js: JetStreamContext) -> Nats:
    """The connection under a JetStream context (nats-py keeps it private)."""
    nc: Nats = js._nc
    return nc
