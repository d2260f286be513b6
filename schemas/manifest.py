"""The data in `extensions/`: one ExtensionManifest per provider adapter, one Profile per
kind of sandbox a tenant can ask for."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from schemas._types import ExtensionId, ProfileId, TenantId, Timestamp, Usd, UsdRate
from schemas.reach import Port, unique_ports

#: The owner of statuses whose tenant no consumer lists; not a consumer's name.
DEFAULT_OWNER = "default"


class Pricing(BaseModel):
    """How an extension charges. `rates` are read by the adapter's own pricing formula,
    which names the rates it needs and rejects a manifest that lacks one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pricing_model: Literal["metered"]
    currency: Literal["USD"] = "USD"
    rates: dict[str, UsdRate] = Field(min_length=1)


class SecretRef(BaseModel):
    """Where an extension's platform key lives in OpenBao (KV v2):
    `<mount>/data/<path>`, fields `keys`. Example: `{mount: secret,
    path: sandboxer/platform/e2b, keys: [api_key]}`. A tenant's own key (BYOK) for the
    same extension lives at `<mount>/data/sandboxer/tenants/<tenant>/<extension_id>`
    with the same field names."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mount: str = Field(default="secret", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    path: str = Field(max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
    keys: list[str] = Field(min_length=1, max_length=8)


def byok_path(tenant: str, extension_id: str) -> str:
    """Where a tenant keeps its own key for an extension (under the secret's mount)."""
    return f"sandboxer/tenants/{tenant}/{extension_id}"


class AccountLimits(BaseModel):
    """What one provider account allows (E2B: 20 concurrent sandboxes on Hobby, 100 on
    Pro): the platform key's account, and each tenant's own (BYOK), counted apart. A
    full account is skipped by the router, which takes the next route (docs/policy.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int | None = Field(default=None, ge=0, le=1_000_000)
    creates_per_minute: int | None = Field(default=None, ge=0, le=1_000_000)


class ExtensionManifest(BaseModel):
    """One provider adapter: which class implements it and what it costs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["extension"]
    id: ExtensionId
    name: str = Field(min_length=1, max_length=80)
    description: str = Field(default="", max_length=2000)
    adapter: str = Field(
        pattern=r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$",
        description="Import path of the adapter class, `module:Class`.",
    )
    pricing: Pricing
    config: dict[str, Any] = Field(
        default_factory=dict, description="Adapter settings, validated by the adapter."
    )
    secret_ref: SecretRef | None = Field(
        default=None, description="The platform key in OpenBao; None: needs no credentials."
    )
    account_limits: AccountLimits | None = Field(
        default=None, description="The provider account's limits; None: none enforced."
    )


class TtlLimits(BaseModel):
    """The lifetimes a profile allows, in seconds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_s: int = Field(ge=1)
    min_s: int = Field(default=1, ge=1)
    max_s: int = Field(le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.min_s <= self.default_s <= self.max_s:
            raise ValueError("ttl limits must satisfy min_s <= default_s <= max_s")
        return self


class Resources(BaseModel):
    """What one sandbox of a profile is given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: int = Field(default=2, ge=1, le=64)
    memory_mb: int = Field(default=2048, ge=128, le=1024 * 1024)
    gpu: str | None = Field(default=None, max_length=32)
    gpu_count: int = Field(default=0, ge=0, le=8)


class TtlOutOfRange(ValueError):
    """A requested TTL lies outside the profile's limits."""


class Profile(BaseModel):
    """A kind of sandbox: ordered routes (first eligible extension wins), TTL limits,
    resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["profile"]
    id: ProfileId
    description: str = Field(default="", max_length=2000)
    pricing_model: Literal["metered"]
    routes: list[ExtensionId] = Field(min_length=1)
    ttl: TtlLimits
    resources: Resources = Field(default_factory=Resources)
    template: str | None = Field(default=None, max_length=128)
    ports: Annotated[list[Port], AfterValidator(unique_ports)] = Field(
        default_factory=list,
        max_length=16,
        description="The ports a sandbox serves; a `ready` status says how to reach each.",
    )
    pins: dict[TenantId, ExtensionId] = Field(
        default_factory=dict,
        description="Tenants held to one extension of `routes`: no other is tried.",
    )

    @model_validator(mode="after")
    def _unique_routes(self) -> Self:
        if len(set(self.routes)) != len(self.routes):
            raise ValueError("routes must not repeat an extension")
        strays = sorted(set(self.pins.values()) - set(self.routes))
        if strays:
            raise ValueError(f"pins name extensions not in routes: {', '.join(strays)}")
        return self

    def routes_for(self, tenant: str) -> list[str]:
        """The routes to walk for `tenant`: its pinned extension alone, or all."""
        pinned = self.pins.get(tenant)
        return [pinned] if pinned else self.routes

    def resolve_ttl(self, ttl_s: int | None) -> int:
        """The TTL to use for a request: its own if within limits, else the default."""
        if ttl_s is None:
            return self.ttl.default_s
        if not self.ttl.min_s <= ttl_s <= self.ttl.max_s:
            raise TtlOutOfRange(
                f"ttl_s={ttl_s} is outside {self.id}'s limits [{self.ttl.min_s}, {self.ttl.max_s}]"
            )
        return ttl_s


class TenantLimits(BaseModel):
    """What each tenant of a consumer may use at once and per window (None: no limit).
    Enforced where credits are held, in the same serialized journal append, so that
    concurrent requests on any number of workers cannot overshoot (docs/policy.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent: int | None = Field(
        default=None, ge=0, le=1_000_000, description="Sandboxes held at once."
    )
    creates_per_minute: int | None = Field(
        default=None, ge=0, le=1_000_000, description="New sandboxes in any 60 s."
    )
    hourly_usd: Annotated[Usd, Field(ge=0)] | None = Field(
        default=None,
        description="Spend per UTC hour: what its sandboxes created that hour cost, or "
        "hold until they are billed.",
    )
    daily_usd: Annotated[Usd, Field(ge=0)] | None = Field(
        default=None, description="The same per UTC day."
    )

    @property
    def unlimited(self) -> bool:
        return all(value is None for value in self.model_dump().values())


class LimitsOverride(BaseModel):
    """An operator's limits for one tenant, instead of its consumer profile's
    (`sandboxer policy set`); kept with who set them, when and why."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    tenant: TenantId
    limits: TenantLimits
    set_by: str = Field(max_length=128)
    set_at: Timestamp
    reason: str = Field(default="", max_length=512)


class ConsumerTtl(BaseModel):
    """A consumer's own TTL rules, within each profile's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)
    max_s: int | None = Field(default=None, ge=1, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.default_s is not None and self.max_s is not None and self.default_s > self.max_s:
            raise ValueError("ttl.default_s must not exceed ttl.max_s")
        return self


class ConsumerManifest(BaseModel):
    """An upstream system (`extensions/consumer.<name>.yaml`): the tenants it may act for.
    Its requests come on `sandbox.provision.<name>` and `sandbox.destroy.<name>`, which
    nats-server lets only its identity publish (docs/security.md); a request there for a
    tenant it does not list is refused with `forbidden`. A tenant belongs to one
    consumer at most, which alone may read its statuses."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["consumer"]
    id: str = Field(max_length=73, pattern=r"^consumer\.[a-z0-9][a-z0-9-]*$")
    description: str = Field(default="", max_length=2000)
    tenants: list[TenantId] = Field(min_length=1, max_length=10_000)
    profiles: list[ProfileId] | None = Field(
        default=None, description="The profiles its tenants may use; omitted: every one."
    )
    gpu_types: list[str] | None = Field(
        default=None,
        max_length=32,
        description="The GPU types its tenants may have; omitted: any; []: none.",
    )
    ttl: ConsumerTtl = Field(default_factory=ConsumerTtl)
    tenant_limits: TenantLimits = Field(
        default_factory=TenantLimits,
        description="Each tenant's limits (an operator may override them per tenant).",
    )
    max_concurrent: int | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Sandboxes of all its tenants at once; omitted: no limit.",
    )
    weight: int = Field(
        default=1,
        ge=1,
        le=100,
        description="Its share of each worker's handler slots against other consumers' "
        "when they wait (2: twice the share of a consumer of weight 1).",
    )

    @model_validator(mode="after")
    def _sound(self) -> Self:
        if self.name == DEFAULT_OWNER:
            raise ValueError(f"consumer.{DEFAULT_OWNER} is reserved (tenants no consumer lists)")
        if len(set(self.tenants)) != len(self.tenants):
            raise ValueError("tenants must not repeat")
        return self

    @property
    def name(self) -> str:
        """The name in its subjects: `sandbox.provision.<name>`."""
        return self.id.removeprefix("consumer.")
