"""The adapter seam: one Protocol that every provider (E2B, Modal, the stub) implements
and that tests plug fakes into. Adding a provider is one module, one manifest, one test
file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Protocol

from nats.js import JetStreamContext
from pydantic import BaseModel

from schemas import CredentialSource, ExtensionManifest, Profile

#: Tags put on every provider sandbox, so reconciliation can find it after a crash.
TAG_SANDBOX_ID = "sandboxer_sandbox_id"
TAG_TENANT = "sandboxer_tenant"
TAG_DEPLOYMENT = "sandboxer_deployment"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A provider key resolved for one call. `values` is never printed, logged or stored."""

    source: CredentialSource = "none"
    values: Mapping[str, str] = field(default_factory=dict, repr=False)


NO_CREDENTIALS = Credentials()


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """What to create: everything an adapter needs, nothing it must look up."""

    sandbox_id: str
    tenant: str
    deployment: str
    profile: Profile
    ttl_s: int
    expires_at: datetime
    template: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def tags(self) -> dict[str, str]:
        """The provider-side tags that tie a sandbox back to us."""
        return {
            TAG_SANDBOX_ID: self.sandbox_id,
            TAG_TENANT: self.tenant,
            TAG_DEPLOYMENT: self.deployment,
        }


@dataclass(frozen=True, slots=True)
class ProviderSandbox:
    """A sandbox as the provider reports it."""

    provider_sandbox_id: str
    tags: Mapping[str, str]
    running: bool
    started_at: datetime
    #: The extension's own MeterEvent fields (e.g. E2B's cpu_count and memory_mb).
    meter_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a finished sandbox cost, by the provider's own formula."""

    started_at: datetime
    stopped_at: datetime
    duration_s: Decimal
    actual_usd: Decimal
    meter_fields: Mapping[str, Any] = field(default_factory=dict)


def seconds_between(started_at: datetime, stopped_at: datetime) -> Decimal:
    """Running seconds from start to stop, to the millisecond; never negative."""
    duration = Decimal(str((stopped_at - started_at).total_seconds()))
    return max(duration, Decimal(0)).quantize(Decimal("0.001"))


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What an adapter is built from: its manifest and the deployment's connections."""

    manifest: ExtensionManifest
    js: JetStreamContext
    deployment: str
    replicas: int = 1


class SandboxAdapter(Protocol):
    """A cloud sandbox provider.

    Implementations are built with `Adapter(context)`. `Rates` and `Config` are pydantic
    models that validate the manifest's `pricing.rates` and `config` at start-up, so a
    wrong manifest stops the service before any request is taken.

    Errors: raise `ProviderRejected` when the provider provably created nothing,
    `ProviderUnavailable` for transient failures (retried), never include a secret in
    a message.
    """

    extension_id: ClassVar[str]
    Rates: ClassVar[type[BaseModel]]
    Config: ClassVar[type[BaseModel]]

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        """Create the sandbox, tagged with `spec.tags`. Idempotent on `spec.sandbox_id`:
        a retry after a lost response returns the sandbox made the first time."""
        ...

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        """Return once the sandbox accepts work; raise if it never will."""
        ...

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        """Destroy the sandbox. Idempotent: an already gone sandbox is not an error."""
        ...

    def estimate_cost(self, profile: Profile, ttl_s: int) -> Decimal:
        """The most a sandbox of `profile` can cost if it lives its whole TTL."""
        ...

    def meter_actual(self, sandbox: ProviderSandbox, stopped_at: datetime) -> Usage:
        """What `sandbox` cost from its `started_at` to `stopped_at`, by the provider's own
        formula and the `meter_fields` it reported at start. Pure: no I/O, so the same
        recorded times always give the same price (the provider may have forgotten the
        sandbox once it is torn down)."""
        ...

    async def find(
        self, tags: Mapping[str, str], credentials: Credentials
    ) -> list[ProviderSandbox]:
        """Running sandboxes whose tags include all of `tags` (for reconciliation)."""
        ...

    async def aclose(self) -> None:
        """Release connections and clients."""
        ...
