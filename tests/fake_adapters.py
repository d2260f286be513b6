"""Adapters that tests plug into the seam through a manifest, like any provider."""

from __future__ import annotations

from typing import ClassVar

from adapters.base import Credentials, ProviderSandbox
from adapters.saas_stub import SaasStubAdapter
from sandboxer.errors import ProviderRejected


class NeverReadyAdapter(SaasStubAdapter):
    """Creates sandboxes that never become ready (a broken image, say)."""

    extension_id: ClassVar[str] = "ext.never-ready"

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        raise ProviderRejected(f"{sandbox.provider_sandbox_id} failed to boot")
