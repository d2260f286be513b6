"""Everything that talks to the outside world: provider adapters behind one seam."""

from adapters.base import (
    NO_CREDENTIALS,
    TAG_DEPLOYMENT,
    TAG_SANDBOX_ID,
    TAG_TENANT,
    AdapterContext,
    Credentials,
    ProviderSandbox,
    SandboxAdapter,
    SandboxSpec,
    Usage,
)

__all__ = [
    "NO_CREDENTIALS",
    "TAG_DEPLOYMENT",
    "TAG_SANDBOX_ID",
    "TAG_TENANT",
    "AdapterContext",
    "Credentials",
    "ProviderSandbox",
    "SandboxAdapter",
    "SandboxSpec",
    "Usage",
]
