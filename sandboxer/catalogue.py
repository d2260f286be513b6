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
    """Reads and writes TemplateRecords."""

    def __init__(self, js: JetStreamContext, kv: KeyValue | None) -> None:
        self._js = js
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> Catalogue:
        """The catalogue of this server (empty, not created, if no service made it)."""
        try:
            kv = await js.key_value(TEMPLATE_BUCKET)
        except NotFoundError:
            kv = None
        return cls(js, kv)

    async def get(self, name: str, version: str) -> tuple[TemplateRecord, int] | None:
        """The record of `name@version` and its revision; None if it was never built."""
        if self._kv is None:
            try:  # opened at first use: a worker may start before any build
                self._kv = await self._js.key_value(TEMPLATE_BUCKET)
            except NotFoundError:
                return None
        try:
            entry = await self._kv.get(template_key(name, version))
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
        if self._kv is None:
            self._kv = await self._js.key_value(TEMPLATE_BUCKET)
        key = template_key(name, version)
        while True:
            found = await self.get(name, version)
            changed = change(found[0] if found else None).model_copy(
                update={"updated_at": utcnow()}
            )
            data = changed.model_dump_json().encode()
            try:
                if found is None:
                    await self._kv.create(key, data)
                else:
                    await self._kv.update(key, data, last=found[1])
                return changed
            except KeyWrongLastSequenceError:
                continue  # another writer won; apply the change to its result

    async def all(self) -> list[TemplateRecord]:
        """Every record, by name and version."""
        if self._kv is None:
            return []
        records = [
            TemplateRecord.model_validate_json(value)
            async for _, value in kv_entries(self._js, TEMPLATE_BUCKET)
        ]
        return sorted(records, key=lambda r: (r.name, r.version))
