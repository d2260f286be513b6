"""Every process's connection (sandboxer/connect.py) over a real nats-server: its lean
request/reply answers each request with its own reply, and times out as nats-py does."""

from __future__ import annotations

import asyncio
import time

import pytest
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout

from sandboxer.connect import LeanNats, connect_nats
from sandboxer.dev.servers import EmbeddedNats
from sandboxer.settings import NatsAuth


async def test_concurrent_requests_each_get_their_own_reply(nats_server: EmbeddedNats) -> None:
    nc = await connect_nats([nats_server.url], NatsAuth(), "test", quiet=True)
    assert isinstance(nc, LeanNats)

    async def echo(msg: Msg) -> None:
        await msg.respond(b"re:" + msg.data)

    await nc.subscribe("echo", cb=echo)
    answers = await asyncio.gather(*(nc.request("echo", str(i).encode(), 5) for i in range(500)))
    assert [a.data for a in answers] == [f"re:{i}".encode() for i in range(500)]
    assert nc._resp_map == {}  # nothing left behind
    await nc.close()


async def test_an_unanswered_request_times_out_in_time(nats_server: EmbeddedNats) -> None:
    nc = await connect_nats([nats_server.url], NatsAuth(), "test", quiet=True)
    await nc.subscribe("silent", cb=_ignore)
    began = time.monotonic()
    with pytest.raises(NatsTimeout):
        await nc.request("silent", b"?", timeout=0.2)
    assert 0.15 < time.monotonic() - began < 2
    assert nc._resp_map == {}
    await nc.close()


async def _ignore(msg: Msg) -> None:
    return None
