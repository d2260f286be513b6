"""`ext.saas-stub`: a simulated metered cloud, for local runs, tests and the benchmark.

Its sandboxes live in their own KV bucket (`sandboxer-stub`), outside any worker (reached
over the process's NATS connection, `AdapterContext.nats`), so a crashed worker's
half-made sandbox can be found again and tests can count sandboxes across crashes.
Latency and failures can be injected through the manifest's `config` or
`SANDBOXER_STUB_<FIELD>` variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import (
    AdapterContext,
    Credentials,
    ProviderSandbox,
    SandboxAdapter,
    SandboxSpec,
    TemplateBuildRef,
    TemplateImage,
    TemplateProgress,
    Usage,
)
from adapters.shared import metered_usage
from sandboxer.errors import ProviderRejected, ProviderUnavailable
from sandboxer.topology import STUB_BUCKET, ensure_bucket, kv_entries
from schemas import Profile, UsdRate, quantize_usd, utcnow


class StubRates(BaseModel):
    """`pricing.rates` of ext.saas-stub: one flat rate per running second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_second: UsdRate

    def cost(self, seconds: Decimal) -> Decimal:
        """The price of `seconds` of one running sandbox, exact to the micro-dollar."""
        return quantize_usd(self.usd_per_second * seconds)


class StubConfig(BaseModel):
    """`config` of ext.saas-stub: simulated behaviour of the fake cloud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Seconds a create takes.
    latency_s: float = Field(default=0.0, ge=0)
    #: Share of creates failing transiently (retried by the worker).
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    #: Share of creates refused for good (nothing created).
    reject_rate: float = Field(default=0.0, ge=0, le=1)
    #: Share of creates that succeed but whose answer is lost (an ambiguous failure).
    lost_response_rate: float = Field(default=0.0, ge=0, le=1)
    #: The first N create attempts of each sandbox fail transiently.
    fail_first: int = Field(default=0, ge=0)


class StubMeterFields(BaseModel):
    """What a stub sandbox's price depends on: the rate it started under."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_second: UsdRate


class _Record(BaseModel):
    """One simulated sandbox, as kept in the stub's bucket."""

    provider_sandbox_id: str
    tags: dict[str, str]
    created_at: datetime
    expires_at: datetime
    terminated_at: datetime | None = None
    template: str | None = None


class _Template(BaseModel):
    """One registered image, as kept in the stub's bucket (`template.<alias>`)."""

    alias: str
    image: str
    digest: str
    registered_at: datetime


def _provider_id(sandbox_id: str) -> str:
    # Derived from our id, like an idempotency key: a retried create finds the first one.
    return "stub-" + hashlib.sha256(sandbox_id.encode()).hexdigest()[:20]


class SaasStubAdapter(SandboxAdapter):
    """A metered cloud that lives in a KV bucket."""

    extension_id: ClassVar[str] = "ext.saas-stub"
    Rates: ClassVar[type[BaseModel]] = StubRates
    Config: ClassVar[type[BaseModel]] = StubConfig
    MeterFields: ClassVar[type[BaseModel]] = StubMeterFields
    env_prefix: ClassVar[str | None] = "SANDBOXER_STUB_"
    can_extend: ClassVar[bool] = True
    builds_templates: ClassVar[bool] = True

    def __init__(self, context: AdapterContext) -> None:
        self.rates = context.rates(StubRates)
        self.config = context.config(StubConfig, self.env_prefix)
        self._replicas = context.settings.replicas
        self._js = context.nats.jetstream(timeout=10.0) if context.nats else None
        self._bucket: KeyValue | None = None

    async def _kv(self) -> KeyValue:
        """The stub cloud's bucket, created at first use."""
        if self._js is None:
            raise ProviderUnavailable("ext.saas-stub: this process has no NATS connection")
        if self._bucket is None:
            config = KeyValueConfig(
                bucket=STUB_BUCKET, storage=StorageType.FILE, replicas=self._replicas
            )
            self._bucket = await ensure_bucket(self._js, config)
        return self._bucket

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        kv = await self._kv()
        if self.config.latency_s:
            await asyncio.sleep(self.config.latency_s)
        await self._inject_create_failures(kv, spec.sandbox_id)
        record = _Record(
            provider_sandbox_id=_provider_id(spec.sandbox_id),
            tags=spec.tags,
            created_at=utcnow(),
            expires_at=spec.expires_at,
            template=spec.template,
        )
        key = f"sbx.{record.provider_sandbox_id}"
        try:
            await kv.create(key, record.model_dump_json().encode())
        except KeyWrongLastSequenceError:
            record = _Record.model_validate_json((await kv.get(key)).value or b"")
        if random.random() < self.config.lost_response_rate:
            raise ProviderUnavailable("stub: connection lost after the create was sent")
        return self._sandbox(record)

    async def _inject_create_failures(self, kv: KeyValue, sandbox_id: str) -> None:
        if self.config.fail_first and await self._count_attempt(kv, sandbox_id) <= (
            self.config.fail_first
        ):
            raise ProviderUnavailable("stub: injected transient failure (fail_first)")
        if random.random() < self.config.failure_rate:
            raise ProviderUnavailable("stub: injected transient failure")
        if random.random() < self.config.reject_rate:
            raise ProviderRejected("stub: injected rejection, nothing created")

    async def _count_attempt(self, kv: KeyValue, sandbox_id: str) -> int:
        key = f"attempts.{sandbox_id}"
        while True:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                try:
                    await kv.create(key, b"1")
                    return 1
                except KeyWrongLastSequenceError:
                    continue
            count = int(entry.value or b"0") + 1
            try:
                await kv.update(key, str(count).encode(), last=entry.revision)
                return count
            except KeyWrongLastSequenceError:
                continue

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        if not sandbox.running:
            raise ProviderUnavailable(f"stub: {sandbox.provider_sandbox_id} is not running")
        return sandbox

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        def stop(record: _Record | None) -> _Record | None:
            if record is None or record.terminated_at is not None:
                return None  # never made, long gone, or stopped already: nothing to do
            # Like a real provider, a sandbox past its timeout stopped running at expiry.
            return record.model_copy(update={"terminated_at": min(utcnow(), record.expires_at)})

        await self._change(provider_sandbox_id, stop)

    async def extend(
        self, provider_sandbox_id: str, expires_at: datetime, credentials: Credentials
    ) -> None:
        def later(record: _Record | None) -> _Record | None:
            if record is None:
                raise ProviderRejected(f"stub: no sandbox {provider_sandbox_id}")
            if record.terminated_at is not None or record.expires_at <= utcnow():
                raise ProviderRejected(f"stub: {provider_sandbox_id} has stopped")
            return record.model_copy(update={"expires_at": max(expires_at, record.expires_at)})

        await self._change(provider_sandbox_id, later)

    async def _change(
        self, provider_sandbox_id: str, change: Callable[[_Record | None], _Record | None]
    ) -> None:
        """Store what `change` makes of a sandbox's record (None: leave it), by
        compare-and-set, again after a concurrent change."""
        kv = await self._kv()
        key = f"sbx.{provider_sandbox_id}"
        while True:
            try:
                entry = await kv.get(key)
            except KeyNotFoundError:
                change(None)
                return
            changed = change(_Record.model_validate_json(entry.value or b""))
            if changed is None:
                return
            try:
                await kv.update(key, changed.model_dump_json().encode(), last=entry.revision)
                return
            except KeyWrongLastSequenceError:
                continue  # a concurrent change won; read its result

    async def register_template(
        self, image: TemplateImage, credentials: Credentials
    ) -> TemplateBuildRef:
        """Records the image under its alias (once: a second registration finds it)."""
        kv = await self._kv()
        record = _Template(
            alias=image.alias, image=image.image, digest=image.digest, registered_at=utcnow()
        )
        with contextlib.suppress(KeyWrongLastSequenceError):  # registered before
            await kv.create(f"template.{image.alias}", record.model_dump_json().encode())
        return TemplateBuildRef(template_id=f"stub-{image.alias}", build_id=image.alias)

    async def template_progress(
        self, ref: TemplateBuildRef, credentials: Credentials
    ) -> TemplateProgress:
        try:
            entry = await (await self._kv()).get(f"template.{ref.build_id}")
        except KeyNotFoundError:
            return TemplateProgress("failed", f"stub: no template {ref.build_id}")
        recorded = _Template.model_validate_json(entry.value or b"")
        return TemplateProgress("ready", logs=(f"stub: {recorded.image} registered",))

    def estimate_cost(self, profile: Profile, ttl_s: int) -> Decimal:
        return self.rates.cost(Decimal(ttl_s))

    def meter_actual(self, sandbox: ProviderSandbox, stopped_at: datetime) -> Usage:
        # The rate the sandbox started under, not today's: a price change never reprices
        # a running sandbox.
        fields = dict(sandbox.meter_fields) or self._meter_fields()
        rate = Decimal(fields.get("usd_per_second", self.rates.usd_per_second))
        return metered_usage(sandbox, stopped_at, rate, fields=fields)

    async def find(
        self, tags: Mapping[str, str], credentials: Credentials
    ) -> list[ProviderSandbox]:
        if self._js is None:
            raise ProviderUnavailable("ext.saas-stub: this process has no NATS connection")
        try:  # a look never creates the cloud (a CLI's reconcile, say)
            await self._js.key_value(STUB_BUCKET)
        except NotFoundError:
            return []
        found = []
        async for _key, value in kv_entries(self._js, STUB_BUCKET, "sbx.>"):
            record = _Record.model_validate_json(value)
            if record.terminated_at is None and tags.items() <= record.tags.items():
                found.append(self._sandbox(record))
        return found

    async def aclose(self) -> None:
        self._bucket = None

    def _sandbox(self, record: _Record) -> ProviderSandbox:
        return ProviderSandbox(
            provider_sandbox_id=record.provider_sandbox_id,
            tags=record.tags,
            running=record.terminated_at is None,
            started_at=record.created_at,
            meter_fields=self._meter_fields(),
        )

    def _meter_fields(self) -> dict[str, Any]:
        return {"usd_per_second": self.rates.usd_per_second}
