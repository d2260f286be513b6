"""Where a provision is routed: the first extension of the profile's route list whose
adapter is loaded and whose credentials resolve for the tenant."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from adapters.base import NO_CREDENTIALS, Credentials, SandboxAdapter
from sandboxer.errors import NoRoute, UnknownExtension
from schemas import Profile

log = logging.getLogger("sandboxer.routing")


@dataclass(frozen=True)
class Route:
    """The chosen extension, with the credentials to call it and why others were skipped."""

    extension_id: str
    adapter: SandboxAdapter
    credentials: Credentials = NO_CREDENTIALS
    skipped: list[tuple[str, str]] = field(default_factory=list)


class Router:
    """Walks a profile's routes in order."""

    def __init__(self, adapters: dict[str, SandboxAdapter]) -> None:
        self._adapters = adapters

    def adapter(self, extension_id: str) -> SandboxAdapter:
        """The loaded adapter of `extension_id` (for destroy, which must not re-route)."""
        try:
            return self._adapters[extension_id]
        except KeyError:
            raise UnknownExtension(f"extension {extension_id} is not loaded") from None

    async def choose(self, profile: Profile, tenant: str) -> Route:
        """The first eligible route, or `NoRoute` listing why each was skipped."""
        skipped: list[tuple[str, str]] = []
        for extension_id in profile.routes:
            adapter = self._adapters.get(extension_id)
            if adapter is None:
                skipped.append((extension_id, "extension not installed"))
                continue
            log.debug(
                "route %s for tenant %s: %s (skipped: %s)",
                profile.id, tenant, extension_id, skipped or "none",
            )  # fmt: skip
            return Route(extension_id, adapter, NO_CREDENTIALS, skipped)
        reasons = ", ".join(f"{ext}: {why}" for ext, why in skipped)
        raise NoRoute(f"no eligible route in {profile.id} ({reasons})")
