"""Write the JSON Schema of every message and data file, for non-Python publishers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.billing import LedgerEntry, UsageRecord
from schemas.manifest import ConsumerManifest, ExtensionManifest, Profile
from schemas.meter import MeterEvent, meter_event_model
from schemas.reach import ConnectGrant, ConnectRequest
from schemas.requests import DestroyRequest, ExtendRequest, ProvisionRequest
from schemas.status import ConnectRefusal, SandboxStatus

_MODELS: dict[str, type[BaseModel]] = {
    "ProvisionRequest": ProvisionRequest,
    "DestroyRequest": DestroyRequest,
    "ExtendRequest": ExtendRequest,
    "ConnectRequest": ConnectRequest,
    "ConnectGrant": ConnectGrant,
    "ConnectRefusal": ConnectRefusal,
    "SandboxStatus": SandboxStatus,
    "MeterEvent": MeterEvent,
    "UsageRecord": UsageRecord,
    "LedgerEntry": LedgerEntry,
    "ExtensionManifest": ExtensionManifest,
    "Profile": Profile,
    "ConsumerManifest": ConsumerManifest,
}


def json_schemas(
    meter_fields: Mapping[str, type[BaseModel]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each contract's JSON Schema (validation mode: what a publisher may send), and
    `MeterEvent.<extension_id>` for each extension of `meter_fields` (extension id ->
    the adapter's `MeterFields`)."""
    models = dict(_MODELS)
    for extension_id, fields in sorted((meter_fields or {}).items()):
        models[f"MeterEvent.{extension_id}"] = meter_event_model(extension_id, fields)
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        schema = model.model_json_schema()
        schema.setdefault("title", name)
        schemas[name] = schema
    return schemas


def export_json_schemas(
    directory: Path, meter_fields: Mapping[str, type[BaseModel]] | None = None
) -> list[Path]:
    """Write `<Name>.schema.json` for every contract into `directory`; return the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in json_schemas(meter_fields).items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
