"""Provider keys from OpenBao (KV v2), resolved per request into memory only.

- A tenant's own key (BYOK) lives at `<mount>/data/sandboxer/tenants/<tenant>/<extension_id>`
  and wins over the platform key named by the manifest's `secret_ref`.
- What is resolved is handed to the adapter and dropped: only its source, path and
  version are recorded (in SandboxStatus), never a value.
- Destroy and metering pin the version recorded at create; if that version was
  deleted or destroyed by a rotation, the current one is used (and a warning logged).
- Results, found or not, are cached for `cache_ttl_s` (default 30 s, at most 1,024
  entries), so that a burst of requests costs OpenBao one read per key.
- OpenBao down or unreachable raises `ProviderUnavailable` (retried by the worker) with
  a message that names the address, never a token or a value.

hvac is a blocking client: every call runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import hvac
import requests
from hvac import exceptions as bao_errors

from adapters.base import Credentials
from sandboxer.errors import ProviderRejected, ProviderUnavailable
from sandboxer.settings import BaoSettings
from schemas import CredentialSource, SecretRef, byok_path

log = logging.getLogger("sandboxer.openbao")


@dataclass(frozen=True)
class ResolvedKey:
    """A key to call a provider with, and where it came from (safe to record)."""

    credentials: Credentials
    path: str
    version: int

    @property
    def source(self) -> CredentialSource:
        return self.credentials.source


@dataclass(frozen=True)
class _Read:
    values: dict[str, str] | None = field(repr=False)  # None: no such secret
    version: int
    expires: float


class CredentialResolver:
    """Resolves provider keys for tenants; one per process."""

    def __init__(self, settings: BaoSettings, *, cache_size: int = 1024) -> None:
        self.settings = settings
        self._client = hvac.Client(url=settings.addr, timeout=settings.timeout_s)
        self._login_lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, int | None], _Read] = OrderedDict()
        self._cache_size = cache_size

    async def resolve(self, tenant: str, extension_id: str, ref: SecretRef) -> ResolvedKey | None:
        """The tenant's own key if it has one, else the platform key; None if neither
        exists."""
        byok = await self.read(ref.mount, byok_path(tenant, extension_id), ref.keys, "byok")
        if byok is not None:
            return byok
        return await self.read(ref.mount, ref.path, ref.keys, "platform")

    async def read(
        self,
        mount: str,
        path: str,
        keys: list[str],
        source: CredentialSource,
        version: int | None = None,
    ) -> ResolvedKey | None:
        """One secret's `keys`, at `version` (or the current one if that version is
        gone); None if the secret does not exist."""
        found = await self._cached_read(mount, path, version)
        if found.values is None and version is not None:
            log.warning(
                "%s/%s version %d is gone (rotated); using the current version",
                mount,
                path,
                version,
            )
            found = await self._cached_read(mount, path, None)
        if found.values is None:
            return None
        missing = [key for key in keys if key not in found.values]
        if missing:
            raise ProviderRejected(f"{mount}/{path} lacks the field(s) {', '.join(missing)}")
        values = {key: found.values[key] for key in keys}
        return ResolvedKey(Credentials(source, values), f"{mount}/{path}", found.version)

    async def _cached_read(self, mount: str, path: str, version: int | None) -> _Read:
        key = (mount, path, version)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > time.monotonic():
            return cached
        found = await asyncio.to_thread(self._read_blocking, mount, path, version)
        self._cache[key] = found
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return found

    def _read_blocking(self, mount: str, path: str, version: int | None) -> _Read:
        expires = time.monotonic() + self.settings.cache_ttl_s
        for attempt in (1, 2):
            self._ensure_login()
            try:
                answer: dict[str, Any] = self._client.secrets.kv.v2.read_secret_version(
                    path=path, version=version, mount_point=mount, raise_on_deleted_version=True
                )
            except bao_errors.InvalidPath:
                return _Read(None, 0, expires)
            except bao_errors.Forbidden:
                if attempt == 1 and self.settings.role_id:
                    self._client.token = None  # the AppRole token expired: log in again
                    continue
                raise ProviderUnavailable(
                    f"OpenBao at {self.settings.addr} denies reading {mount}/{path}"
                ) from None
            except (
                bao_errors.VaultDown,
                bao_errors.InternalServerError,
                bao_errors.BadGateway,
                requests.RequestException,
            ) as exc:
                log.error("OpenBao at %s unreachable: %s", self.settings.addr, type(exc).__name__)
                raise ProviderUnavailable(
                    f"OpenBao at {self.settings.addr} is unavailable ({type(exc).__name__})"
                ) from None
            data = answer["data"]
            return _Read(dict(data["data"]), int(data["metadata"]["version"]), expires)
        raise AssertionError("unreachable")

    def _ensure_login(self) -> None:
        with self._login_lock:
            if self._client.token:
                return
            if self.settings.token:
                self._client.token = self.settings.token
                return
            if not (self.settings.role_id and self.settings.secret_id):
                raise ProviderUnavailable("OpenBao: no BAO_TOKEN and no AppRole configured")
            try:
                self._client.auth.approle.login(
                    role_id=self.settings.role_id, secret_id=self.settings.secret_id
                )
            except (bao_errors.VaultError, requests.RequestException) as exc:
                raise ProviderUnavailable(
                    f"OpenBao AppRole login at {self.settings.addr} failed ({type(exc).__name__})"
                ) from None

    def close(self) -> None:
        self._client.adapter.close()
