"""Loads and validates `extensions/` at start-up: a wrong file stops the service with a
message naming the file and the field, before any request is taken."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import BaseModel, ValidationError

from adapters.base import AdapterContext, SandboxAdapter
from sandboxer.errors import ManifestError, UnknownProfile
from schemas import ExtensionManifest, Profile

log = logging.getLogger("sandboxer.registry")


def _describe(path: Path, error: ValidationError, prefix: str = "") -> str:
    problems = "; ".join(
        f"{prefix}{'.'.join(str(p) for p in item['loc']) or '<root>'}: {item['msg']}"
        for item in error.errors()
    )
    return f"{path}: {problems}"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a mapping at the top level")
    return data


def load_adapter_class(manifest: ExtensionManifest, path: Path) -> type[SandboxAdapter]:
    """Import the manifest's adapter class and check its rates and config against it."""
    module_name, _, class_name = manifest.adapter.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ManifestError(f"{path}: adapter: cannot import {manifest.adapter}: {exc}") from None
    for attr, data, where in (
        ("Rates", manifest.pricing.rates, "pricing.rates."),
        ("Config", manifest.config, "config."),
    ):
        model = cast(type[BaseModel], getattr(cls, attr))
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(_describe(path, exc, where)) from None
    if getattr(cls, "extension_id", None) != manifest.id:
        raise ManifestError(
            f"{path}: id: {manifest.id} but {manifest.adapter} implements "
            f"{getattr(cls, 'extension_id', '?')}"
        )
    return cast(type[SandboxAdapter], cls)


@dataclass(frozen=True)
class Registry:
    """Every extension manifest and profile, validated."""

    extensions: dict[str, ExtensionManifest]
    adapter_classes: dict[str, type[SandboxAdapter]]
    profiles: dict[str, Profile]

    @classmethod
    def load(cls, directory: Path) -> Registry:
        """Read `ext.*.yaml` and `profile.*.yaml` from `directory`."""
        if not directory.is_dir():
            raise ManifestError(f"{directory}: extensions directory not found")
        extensions: dict[str, ExtensionManifest] = {}
        classes: dict[str, type[SandboxAdapter]] = {}
        profiles: dict[str, Profile] = {}
        for path in sorted(directory.glob("*.y*ml")):
            data = _read_yaml(path)
            model: type[ExtensionManifest] | type[Profile]
            model = Profile if path.name.startswith("profile.") else ExtensionManifest
            try:
                item = model.model_validate(data)
            except ValidationError as exc:
                raise ManifestError(_describe(path, exc)) from None
            if path.stem != item.id:
                raise ManifestError(f"{path}: id: {item.id!r} does not match the file name")
            if isinstance(item, Profile):
                profiles[item.id] = item
            else:
                extensions[item.id] = item
                classes[item.id] = load_adapter_class(item, path)
        if not profiles:
            raise ManifestError(f"{directory}: no profile.*.yaml found")
        return cls(extensions=extensions, adapter_classes=classes, profiles=profiles)

    def profile(self, profile_id: str) -> Profile:
        """The profile, or `UnknownProfile`."""
        try:
            return self.profiles[profile_id]
        except KeyError:
            raise UnknownProfile(f"unknown profile {profile_id!r}") from None

    def build_adapters(self, context_for: dict[str, AdapterContext]) -> dict[str, SandboxAdapter]:
        """One adapter instance per extension, built from its context. An adapter whose
        optional dependency (`requires`) is not installed is left out, with a warning:
        routing then treats its extension as not installed."""
        adapters = {}
        for ext_id, cls in self.adapter_classes.items():
            requires = getattr(cls, "requires", None)
            if requires and importlib.util.find_spec(requires) is None:
                log.warning(
                    "%s skipped: it needs the %r package (pip install sandboxer[%s])",
                    ext_id,
                    requires,
                    requires,
                )
                continue
            adapters[ext_id] = cls(context_for[ext_id])  # type: ignore[call-arg]
        return adapters
