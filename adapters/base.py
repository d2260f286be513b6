"""The adapter seam: one Protocol that every provider (E2B, Modal, the stub, a test's
own) implements, and the values that cross it.

A provider is one module with a class that subclasses `SandboxAdapter`, and one
manifest in `extensions/` that names it (`adapter: package.module:Class`). Nothing
else lists providers: the registry (`adapters/registry.py`) builds whatever the
manifests name, the router walks a profile's routes, and the meter event of an
extension is the common event plus the adapter's own `MeterFields`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, Literal, Protocol, TypeVar

from nats.aio.client import Client as Nats
from pydantic import BaseModel

from sandboxer.errors import ProviderRejected
from sandboxer.settings import Settings
from schemas import (
    ControlEndpoint,
    Credential,
    CredentialSource,
    Endpoint,
    ExtensionManifest,
    Port,
    Profile,
)

#: Tags put on every provider sandbox, so reconciliation can find it after a crash.
TAG_SANDBOX_ID = "sandboxer_sandbox_id"
TAG_TENANT = "sandboxer_tenant"
TAG_DEPLOYMENT = "sandboxer_deployment"

M = TypeVar("M", bound=BaseModel)


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
    #: What the price depends on, as the adapter's `MeterFields` describe it (E2B:
    #: cpu_count and memory_mb); copied into the sandbox's meter events.
    meter_fields: Mapping[str, Any] = field(default_factory=dict)
    #: The ports it was asked to serve (the profile's), and once ready where each is
    #: reached and the provider's control API (no secrets in either).
    ports: tuple[Port, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    control: ControlEndpoint | None = None


@dataclass(frozen=True, slots=True)
class Reach:
    """What `connect` is asked for: one ready sandbox, who asks, which port (None:
    every endpoint and the control API)."""

    sandbox_id: str
    tenant: str
    requester: str
    provider_sandbox_id: str
    endpoints: tuple[Endpoint, ...]
    control: ControlEndpoint | None
    expires_at: datetime
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """The credentials `connect` minted or fetched: handed to the requester in a
    core-NATS reply, never stored, logged or raised (their secrets are SecretStr)."""

    credentials: list[Credential]
    control: Credential | None = None
    control_sdk: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TemplateImage:
    """A built image (Packer's artifact) to register as one provider's template.

    `image` is a pullable OCI reference (`registry/repo:tag` or `…@sha256:…`) and
    `digest` its content digest; `alias` is the provider-side name, the same for the
    same name, version and digest, so a repeated registration finds the first."""

    name: str
    version: str
    image: str
    digest: str
    cpu: int
    memory_mb: int
    start_cmd: str | None = None
    ready_cmd: str | None = None

    @property
    def alias(self) -> str:
        """`<name>-<version>-<first 12 hex of the digest>`, lower case, `[a-z0-9-]`."""
        hexes = self.digest.partition(":")[2] or self.digest
        raw = f"{self.name}-{self.version}-{hexes[:12]}".lower()
        return "".join(c if c.isalnum() else "-" for c in raw).strip("-")


@dataclass(frozen=True, slots=True)
class TemplateBuildRef:
    """A registration the provider has accepted: the id a create takes
    (`SandboxSpec.template`) and, where the provider builds asynchronously, the build
    to poll."""

    template_id: str
    build_id: str = ""


TemplateState = Literal["building", "ready", "failed"]


@dataclass(frozen=True, slots=True)
class TemplateProgress:
    """One poll of a registration: its state, the provider's reason when it failed, and
    the build log lines that are new since the previous poll."""

    state: TemplateState
    reason: str | None = None
    logs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """What a finished sandbox cost, by the provider's own formula."""

    started_at: datetime
    stopped_at: datetime
    duration_s: Decimal
    actual_usd: Decimal
    meter_fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What an adapter is built from: its manifest, the process's settings and, for a
    provider that lives on NATS itself (the stub cloud), the process's connection."""

    manifest: ExtensionManifest
    settings: Settings
    nats: Nats | None = None

    @property
    def deployment(self) -> str:
        return self.settings.deployment

    def rates(self, model: type[M]) -> M:
        """The manifest's `pricing.rates`, validated by `model`."""
        return model.model_validate(self.manifest.pricing.rates)

    def config(self, model: type[M], env_prefix: str | None = None) -> M:
        """The manifest's `config` validated by `model`, after the environment's
        `<env_prefix><FIELD>` variables (read by Settings) override its fields."""
        overrides = (
            self.settings.config_overrides(env_prefix, list(model.model_fields))
            if env_prefix
            else {}
        )
        return model.model_validate({**self.manifest.config, **overrides})


class SandboxAdapter(Protocol):
    """A cloud sandbox provider.

    Subclass it and set the class attributes; the registry builds one instance per
    process with `Adapter(context)`, after checking the manifest's `pricing.rates`
    against `Rates` and its `config` against `Config`, so a wrong manifest stops the
    service before any request is taken. An adapter whose `requires` package is not
    installed is left out (its routes are skipped) instead of stopping the service.

    Errors: raise `ProviderRejected` when the provider provably created nothing,
    `ProviderUnavailable` for transient failures (retried), `ProviderFailed` when
    something may exist but retrying will not help; never put a secret in a message
    (`adapters.shared.redact`).
    """

    #: The manifest id this class implements, `ext.<name>`.
    extension_id: ClassVar[str]
    #: Validates `pricing.rates`; the price formula lives on it, next to the rates.
    Rates: ClassVar[type[BaseModel]]
    #: Validates `config`.
    Config: ClassVar[type[BaseModel]]
    #: The fields this extension adds to its meter events (what its price depends on).
    MeterFields: ClassVar[type[BaseModel]]
    #: An optional package the adapter needs (`pip install sandboxer[<it>]`).
    requires: ClassVar[str | None] = None
    #: Environment variables `<env_prefix><FIELD>` override `config` fields.
    env_prefix: ClassVar[str | None] = None
    #: Whether its sandboxes serve the ports a profile declares; a profile with ports
    #: skips an extension whose adapter does not (`route explain`: `no_ports`).
    serves_ports: ClassVar[bool] = False
    #: Whether the provider lets a running sandbox live longer (`extend`); a
    #: `sandbox.extend` of one whose adapter cannot is refused before anything changes.
    can_extend: ClassVar[bool] = False
    #: Whether it can register a built image as one of its templates
    #: (`register_template`); a logical template lists only providers that can.
    builds_templates: ClassVar[bool] = False

    def __init__(self, context: AdapterContext) -> None: ...

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        """Create the sandbox, tagged with `spec.tags`. Idempotent on `spec.sandbox_id`:
        a retry after a lost response returns the sandbox made the first time."""
        ...

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        """Return once the sandbox accepts work, with `started_at` and `meter_fields`;
        raise if it never will."""
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

    async def connect(self, reach: Reach, credentials: Credentials) -> Grant:
        """The credentials that open `reach`'s endpoints (fetched from the provider, or
        minted for `reach.requester`). Never logs them; errors never contain them."""
        raise ProviderRejected(f"{self.extension_id}: its sandboxes serve no ports")

    async def extend(
        self, provider_sandbox_id: str, expires_at: datetime, credentials: Credentials
    ) -> None:
        """Have the provider keep the sandbox running until `expires_at` (an absolute
        time, so repeating it is harmless). `ProviderRejected` if the provider cannot."""
        raise ProviderRejected(f"{self.extension_id}: cannot extend a running sandbox")

    async def register_template(
        self, image: TemplateImage, credentials: Credentials
    ) -> TemplateBuildRef:
        """Start making `image` one of the provider's templates. Idempotent on
        `image.alias`: a template already registered under it is returned, and nothing
        is built twice. Raise `ProviderRejected` if the provider refuses it outright."""
        raise ProviderRejected(f"{self.extension_id}: cannot register templates")

    async def template_progress(
        self, ref: TemplateBuildRef, credentials: Credentials
    ) -> TemplateProgress:
        """Poll a registration `register_template` started (also after a restart: `ref`
        is all it needs)."""
        raise ProviderRejected(f"{self.extension_id}: cannot register templates")

    async def aclose(self) -> None:
        """Release connections and clients."""
        return None
