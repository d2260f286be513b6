"""settle(): one ack, nak or dead letter per delivery; JetStream outages are ridden out
within the delivery. Driven through a recording Delivery (the Protocol handlers see)."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from nats.js.errors import NoStreamResponseError

from consumers import delivery as delivery_module
from consumers.delivery import settle
from sandboxer.errors import ProviderRejected
from sandboxer.settings import Settings


class Recording:
    def __init__(self, attempt: int = 1) -> None:
        self.attempt = attempt
        self.headers: Mapping[str, str] = {}
        self.subject = "sandbox.provision"
        self.outcomes: list[str] = []
        self.kept_alive = 0

    async def ack(self) -> None:
        self.outcomes.append("ack")

    async def nack(self, delay_s: float) -> None:
        self.outcomes.append("nack")

    async def term(self) -> None:
        self.outcomes.append("term")

    async def dead_letter(self, reason: str) -> None:
        self.outcomes.append(f"dead: {reason}")

    async def in_progress(self) -> None:
        self.kept_alive += 1


async def nothing(exc: Exception) -> None:
    pass


async def test_a_jetstream_outage_is_ridden_out_within_the_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery_module, "JETSTREAM_PATIENCE_S", 5.0)
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise NoStreamResponseError

    seen = Recording()
    await settle("job", work, seen, Settings(), give_up=nothing)
    assert (calls, seen.outcomes, seen.kept_alive) == (3, ["ack"], 2)


async def test_a_long_outage_becomes_an_ordinary_failed_delivery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery_module, "JETSTREAM_PATIENCE_S", 0.5)

    async def work() -> None:
        raise NoStreamResponseError

    seen = Recording(attempt=1)
    await settle("job", work, seen, Settings(), give_up=nothing)
    assert seen.outcomes == ["nack"]  # retried later, within max_deliver
    last = Recording(attempt=Settings().max_deliver)
    await settle("job", work, last, Settings(), give_up=nothing)
    assert last.outcomes[0].startswith("dead: job: NoStreamResponseError after 5 deliveries")


async def test_a_refusal_is_an_answer_or_a_dead_letter() -> None:
    async def work() -> None:
        raise ProviderRejected("no")

    answered, kept = Recording(), Recording()
    await settle("job", work, answered, Settings(), give_up=nothing, rejections_answered=True)
    await settle("job", work, kept, Settings(), give_up=nothing)
    assert answered.outcomes == ["ack"]
    assert kept.outcomes == ["dead: job: ProviderRejected: no"]
