"""The template catalogue: one TemplateRecord per logical template version in the
`sandboxer-templates` bucket, keyed `<name>.<version>`. Only the template worker writes
it, by compare-and-set on the revision; routing and the CLI read it."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from sandboxer.topology import TEMPLATE_BUCKET, kv_entries
from schemas import TemplateRecord, utcnow


def template_key(name: str, version: str) -> str:
    return f"{name}.{version}"


class Catalogue:
    """Reads and writes TemplateRecords. The bucket is opened at first use: a reader
    may start before any service made it (then nothing was ever built)."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue | None:
        if self._kv is None:
            try:
                self._kv = await self._js.key_value(TEMPLATE_BUCKET)
            except NotFoundError:
                return None
        return self._kv

    async def get(self, name: str, version: str) -> tuple[TemplateRecord, int] | None:
        """The record of `name@version` and its revision; None if it was never built."""
        kv = await self._bucket()
        if kv is None:
            return None
        try:
            entry = await kv.get(template_key(name, version))
        except KeyNotFoundError:
            return None
        if not entry.value:  # deleted by an operator
            return None
        return TemplateRecord.model_validate_json(entry.value), entry.revision or 0

    async def change(
        self,
        name: str,
        version: str,
        change: Callable[[TemplateRecord | None], TemplateRecord],
    ) -> TemplateRecord:
        """Store what `change` makes of the current record (None: there is none), by
        compare-and-set, again after a concurrent change; returns what was stored."""
        kv = await self._bucket() or await self._js.key_value(TEMPLATE_BUCKET)
        key = template_key(name, version)
        while True:
            found = await self.get(name, version)
            changed = change(found[0] if found else None).model_copy(
                update={"updated_at": utcnow()}
            )
            data = changed.model_dump_json().encode()
            try:
                if found is None:
                    await kv.create(key, data)
                else:
                    await kv.update(key, data, last=found[1])
                return changed
            except KeyWrongLastSequenceError:
                continue  # another writer won; apply the change to its result

    async def all(self) -> list[TemplateRecord]:
        """Every record, by name and version."""
        if await self._bucket() is None:
            return []
        records = [
            TemplateRecord.model_validate_json(value)
            async for _, value in kv_entries(self._js, TEMPLATE_BUCKET)
        ]
        return sorted(records, key=lambda r: (r.name, r.version))
