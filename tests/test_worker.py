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


async def test_storage_is_bounded_where_it_holds_no_money(js: JetStreamContext) -> None:
    day = 24 * 3600
    limits = {}
    for stream in await js.streams_info():
        config = stream.config
        limits[config.name] = (config.max_age, config.max_bytes, config.max_msg_size)
    assert limits["KV_sandboxer-status"][0] == 35 * day  # statuses expire
    for name in ("SANDBOX_REQUESTS", "SANDBOX_STATUS", "DEAD_LETTERS", "ADVISORIES"):
        assert (limits[name][1] or -1) > 0, name  # a size bound
    for name in ("SANDBOX_METER", "CREDITS_LEDGER", "BILLING"):
        assert (limits[name][1] or -1) < 0, name  # money: never dropped for size
    assert not limits["CREDITS_LEDGER"][0]  # the journal is never trimmed
    for name in ("SANDBOX_REQUESTS", "SANDBOX_METER", "CREDITS_LEDGER", "BILLING"):
        assert 0 < (limits[name][2] or -1) <= 64 * 1024, name  # inputs have a size limit
