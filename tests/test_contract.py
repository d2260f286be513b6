"""The AsyncAPI document: committed, generated from the code, and whole."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from adapters.registry import Registry
from consumers.contract import asyncapi_document
from sandboxer import topology
from sandboxer.cli import app
from sandboxer.settings import default_extensions_dir
from tests.conftest import ROOT

COMMITTED = ROOT / "docs" / "asyncapi.json"


def generated() -> dict[str, Any]:
    registry = Registry.load(default_extensions_dir())
    fields = {ext: cls.MeterFields for ext, cls in registry.adapter_classes.items()}
    return asyncapi_document(fields)


def test_the_committed_document_is_what_the_code_generates() -> None:
    assert json.loads(COMMITTED.read_text()) == generated(), (
        "docs/asyncapi.json drifted from the code: run "
        "`sandboxer schemas asyncapi --output docs/asyncapi.json` and commit it"
    )
    printed = CliRunner().invoke(app, ["schemas", "asyncapi"])
    assert printed.exit_code == 0 and json.loads(printed.output) == generated()


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def test_every_reference_resolves_and_every_subject_is_there() -> None:
    document = generated()
    assert document["asyncapi"].startswith("3.")
    for ref in _refs(document):
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
            node = node[part]
    # A reply channel has no address (the asker's inbox).
    addresses = {c["address"] for c in document["channels"].values() if c["address"]}
    prefixes = [
        topology.PROVISION_SUBJECT,
        topology.DESTROY_SUBJECT,
        topology.EXTEND_SUBJECT,
        topology.CONNECT_SUBJECT_PREFIX,
        topology.STATUS_SUBJECT_PREFIX,
        topology.METER_SUBJECT_PREFIX,
        topology.SCHEDULE_SUBJECT_PREFIX,
        topology.USAGE_SUBJECT,
        topology.LEDGER_SUBJECT_PREFIX,
        topology.DLQ_SUBJECT_PREFIX,
    ]
    for prefix in prefixes:
        assert any(a == prefix or a.startswith(f"{prefix}.") for a in addresses), prefix
    # Every stream's subjects are documented channels.
    for stream in topology.stream_configs(1):
        for subject in stream.subjects or []:
            if subject.startswith("$"):  # the server's own advisories
                continue
            head = subject.split(".>")[0].split(".*")[0]
            assert any(a.startswith(head) for a in addresses), f"{stream.name}: {subject}"
    for operation in document["operations"].values():
        assert operation["action"] in ("send", "receive") and operation["messages"]
