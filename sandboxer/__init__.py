"""sandboxer core: settings, the extension registry, routing, JetStream topology and the
CLI. The contract lives in `schemas`, the outside world in `adapters`, the FastStream
apps in `consumers`."""

__version__ = "0.1.0"
