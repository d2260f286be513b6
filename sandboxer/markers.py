"""The billing consumers' durable marks (KV `sandboxer-billing`), which stop a replay
a week later from publishing or exporting a usage record twice:

- `usage.<record_id>`: the usage record was published on `billing.usage`;
- `exported.<record_id>`: fin-hub took it (the value is fin-hub's HTTP status);
- `dead.<record_id>`: fin-hub refused it for good (kept as a dead letter).
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from sandboxer.topology import BILLING_BUCKET


class BillingMarkers:
    """Reads and writes the marks of usage records."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> BillingMarkers:
        return cls(await js.key_value(BILLING_BUCKET))

    async def published(self, record_id: str) -> bool:
        """True once the record was published on `billing.usage`."""
        return await self._has(f"usage.{record_id}")

    async def mark_published(self, record_id: str) -> None:
        await self._kv.put(f"usage.{record_id}", b"published")

    async def exported(self, record_id: str) -> bool:
        """True once fin-hub took the record."""
        return await self._has(f"exported.{record_id}")

    async def mark_exported(self, record_id: str, http_status: int | None) -> None:
        await self._kv.put(f"exported.{record_id}", str(http_status).encode())

    async def mark_refused(self, record_id: str, http_status: int | None) -> None:
        await self._kv.put(f"dead.{record_id}", str(http_status).encode())

    async def _has(self, key: str) -> bool:
        try:
            await self._kv.get(key)
        except KeyNotFoundError:
            return False
        return True
