"""Adapters that tests plug into the seam through a manifest, like any provider."""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

from pydantic import BaseModel

from adapters.base import Credentials, ProviderSandbox, SandboxSpec
from adapters.e2b import E2BMeterFields
from adapters.saas_stub import SaasStubAdapter
from sandboxer.errors import ProviderRejected


class NeverReadyAdapter(SaasStubAdapter):
    """Creates sandboxes that never become ready (a broken image, say)."""

    extension_id: ClassVar[str] = "ext.never-ready"

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        raise ProviderRejected(f"{sandbox.provider_sandbox_id} failed to boot")


class KeyedStubAdapter(SaasStubAdapter):
    """Stands in for a provider that needs a key (mounted as `ext.e2b` by routing
    tests; the real E2B adapter comes with its own fake API). It refuses calls without
    an `api_key`, and records a fingerprint (never the value) of the key that created
    and destroyed each sandbox."""

    extension_id: ClassVar[str] = "ext.e2b"
    MeterFields: ClassVar[type[BaseModel]] = E2BMeterFields

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        sandbox = await super().provision(spec, self._require_key(credentials))
        await self._remember(sandbox.provider_sandbox_id, "create", credentials)
        return sandbox

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        await super().teardown(provider_sandbox_id, self._require_key(credentials))
        await self._remember(provider_sandbox_id, "destroy", credentials)

    @staticmethod
    def _require_key(credentials: Credentials) -> Credentials:
        if "api_key" not in credentials.values:
            raise ProviderRejected("401: missing api key")
        return credentials

    async def _remember(self, provider_sandbox_id: str, op: str, credentials: Credentials) -> None:
        kv = await self._kv()
        await kv.put(
            f"fingerprint.{provider_sandbox_id}.{op}",
            fingerprint(credentials.values["api_key"]).encode(),
        )

    def _meter_fields(self) -> dict[str, Any]:
        return {"cpu_count": 2, "memory_mb": 2048}


def fingerprint(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class NeedsAMissingPackage(SaasStubAdapter):
    """An adapter whose optional dependency is not installed."""

    extension_id: ClassVar[str] = "ext.needs-missing"
    requires: ClassVar[str] = "sandboxer_no_such_package"
