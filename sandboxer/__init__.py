"""sandboxer's foundations and stores: settings (the only reader of the environment),
errors, ids, the JetStream topology, NATS connections, the money rules, the status,
credits and billing-marker stores, and the client. Above them: the `sandboxer` command
(`cli/`, which starts everything) and the dev-only servers and fakes (`dev/`). The
contract lives in `schemas`, the outside world in `adapters`, the apps in `consumers`."""

__version__ = "0.1.0"
