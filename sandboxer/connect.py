"""Connections to NATS: every process and the stub cloud open theirs here, with the
same options, so that what a connection needs (servers, reconnects) is said once."""

from __future__ import annotations

import asyncio
import contextlib

import nats
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from sandboxer.settings import Settings


async def connect_nats(settings: Settings, name: str) -> Nats:
    """A connection to `settings.nats_servers` that reconnects forever: a long-lived
    process rides over a server restart or a cluster's leader election."""
    return await nats.connect(settings.nats_servers, max_reconnect_attempts=-1, name=name)


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
