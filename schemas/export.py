"""Write the JSON Schema of every message and data file, for non-Python publishers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, TypeAdapter

from schemas.billing import LedgerEntry, UsageRecord
from schemas.manifest import ExtensionManifest, Profile
from schemas.meter import meter_event_adapter
from schemas.requests import DestroyRequest, ProvisionRequest
from schemas.status import SandboxStatus

_MODELS: dict[str, type[BaseModel] | TypeAdapter[Any]] = {
    "ProvisionRequest": ProvisionRequest,
    "DestroyRequest": DestroyRequest,
    "SandboxStatus": SandboxStatus,
    "MeterEvent": meter_event_adapter,
    "UsageRecord": UsageRecord,
    "LedgerEntry": LedgerEntry,
    "ExtensionManifest": ExtensionManifest,
    "Profile": Profile,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    """Each contract's JSON Schema (validation mode: what a publisher may send)."""
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in _MODELS.items():
        if isinstance(model, TypeAdapter):
            schema = model.json_schema()
        else:
            schema = model.model_json_schema()
        schema.setdefault("title", name)
        schemas[name] = schema
    return schemas


def export_json_schemas(directory: Path) -> list[Path]:
    """Write `<Name>.schema.json` for every contract into `directory`; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
