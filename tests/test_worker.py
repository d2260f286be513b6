"""Worker lifecycle: consumer settings follow the configuration across restarts."""

from __future__ import annotations

from nats.js import JetStreamContext

from tests.conftest import Start


async def test_restart_applies_changed_consumer_settings(
    start_worker: Start, js: JetStreamContext
) -> None:
    first = await start_worker(ack_wait_s=2.0, max_deliver=3)
    await first.stop()
    await start_worker(ack_wait_s=7.0, max_deliver=9)
    info = await js.consumer_info("SANDBOX_REQUESTS", "provisioner-provision")
    assert info.config.ack_wait == 7.0
    assert info.config.max_deliver == 11  # the handler gives up at 9; two spare for crashes
    destroy = await js.consumer_info("SANDBOX_REQUESTS", "provisioner-destroy")
    assert destroy.config.ack_wait == 7.0
