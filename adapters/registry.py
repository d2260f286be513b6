"""Loads and validates `extensions/` at start-up: a wrong file stops the service with a
message naming the file and the field, before any request is taken. It builds one
adapter per extension manifest, from whatever module the manifest names: no list of
providers exists anywhere else."""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from nats.aio.client import Client as Nats
from pydantic import ValidationError

from adapters.base import AdapterContext, SandboxAdapter
from sandboxer.errors import (
    Forbidden,
    ManifestError,
    NotFound,
    UnknownProfile,
    validation_problems,
)
from sandboxer.settings import Settings
from schemas import (
    DEFAULT_OWNER,
    ConsumerManifest,
    ExtensionManifest,
    MeterEvent,
    Profile,
    TemplateManifest,
    logical_template,
    meter_event_model,
)

log = logging.getLogger("adapters.registry")


#: The model of each kind of file, by the first word of its name.
_MODELS: dict[
    str,
    type[ExtensionManifest] | type[Profile] | type[ConsumerManifest] | type[TemplateManifest],
] = {
    "ext": ExtensionManifest,
    "profile": Profile,
    "consumer": ConsumerManifest,
    "template": TemplateManifest,
}


def _problems(path: Path, error: ValidationError, prefix: str = "") -> str:
    return f"{path}: {validation_problems(error, prefix)}"


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
        found: Any = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ManifestError(f"{path}: adapter: cannot import {manifest.adapter}: {exc}") from None
    # The seam is a Protocol that adapters subclass (it gives them its defaults).
    if not (isinstance(found, type) and SandboxAdapter in found.__mro__):
        raise ManifestError(
            f"{path}: adapter: {manifest.adapter} does not subclass adapters.base.SandboxAdapter"
        )
    cls = cast(type[SandboxAdapter], found)
    for model, data, where in (
        (cls.Rates, manifest.pricing.rates, "pricing.rates."),
        (cls.Config, manifest.config, "config."),
    ):
        try:
            model.model_validate(data)
        except ValidationError as exc:
            raise ManifestError(_problems(path, exc, where)) from None
    if cls.extension_id != manifest.id:
        raise ManifestError(
            f"{path}: id: {manifest.id} but {manifest.adapter} implements {cls.extension_id}"
        )
    return cls


def _check_templates(
    directory: Path,
    templates: dict[str, TemplateManifest],
    classes: dict[str, type[SandboxAdapter]],
    profiles: dict[str, Profile],
) -> None:
    """A template lists providers that can register images (its Packer file is looked
    for when it is built: only the template worker needs it); a profile on a logical
    template names one that exists, at its version, listed on every route (a route the
    template is never built for could never be taken)."""
    for template in templates.values():
        where = directory / f"{template.id}.yaml"
        for ext in template.providers:
            cls = classes.get(ext)
            if cls is None:
                raise ManifestError(f"{where}: providers: no extension {ext}")
            if not cls.builds_templates:
                raise ManifestError(f"{where}: providers: {ext} cannot register templates")
    for profile in profiles.values():
        logical = logical_template(profile.template)
        if logical is None:
            continue
        where = directory / f"{profile.id}.yaml"
        found = templates.get(logical[0])
        if found is None:
            raise ManifestError(f"{where}: template: no template.{logical[0]}.yaml")
        if found.version != logical[1]:
            raise ManifestError(
                f"{where}: template: {profile.template}, but template.{found.name} is at "
                f"version {found.version}"
            )
        strays = sorted(set(profile.routes) - set(found.providers))
        if strays:
            raise ManifestError(
                f"{where}: routes: {', '.join(strays)} not in template.{found.name}'s providers"
            )


@dataclass(frozen=True)
class Registry:
    """Every extension manifest and profile, validated."""

    extensions: dict[str, ExtensionManifest]
    adapter_classes: dict[str, type[SandboxAdapter]]
    profiles: dict[str, Profile]
    #: Upstream consumers by name, and the consumer of each tenant one lists.
    consumers: dict[str, ConsumerManifest] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    #: Logical templates by name, and the Packer file of each.
    templates: dict[str, TemplateManifest] = field(default_factory=dict)
    packer_files: dict[str, Path] = field(default_factory=dict)
    _meter_events: dict[str, type[MeterEvent]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, directory: Path) -> Registry:
        """Read `ext.*.yaml`, `profile.*.yaml`, `consumer.*.yaml` and `template.*.yaml`
        from `directory`."""
        if not directory.is_dir():
            raise ManifestError(f"{directory}: extensions directory not found")
        extensions: dict[str, ExtensionManifest] = {}
        classes: dict[str, type[SandboxAdapter]] = {}
        profiles: dict[str, Profile] = {}
        consumers: dict[str, ConsumerManifest] = {}
        owners: dict[str, str] = {}
        templates: dict[str, TemplateManifest] = {}
        packer_files: dict[str, Path] = {}
        for path in sorted(directory.glob("*.y*ml")):
            data = _read_yaml(path)
            kind = path.name.partition(".")[0]
            model = _MODELS.get(kind, ExtensionManifest)
            try:
                item = model.model_validate(data)
            except ValidationError as exc:
                raise ManifestError(_problems(path, exc)) from None
            if path.stem != item.id:
                raise ManifestError(f"{path}: id: {item.id!r} does not match the file name")
            if isinstance(item, Profile):
                profiles[item.id] = item
            elif isinstance(item, ConsumerManifest):
                consumers[item.name] = item
                for tenant in item.tenants:
                    if tenant in owners:
                        raise ManifestError(
                            f"{path}: tenants: {tenant} belongs to consumer.{owners[tenant]} "
                            "already; a tenant has one consumer at most"
                        )
                    owners[tenant] = item.name
            elif isinstance(item, TemplateManifest):
                templates[item.name] = item
                packer_files[item.name] = (path.parent / item.packer).resolve()
            else:
                extensions[item.id] = item
                classes[item.id] = load_adapter_class(item, path)
        if not profiles:
            raise ManifestError(f"{directory}: no profile.*.yaml found")
        for consumer in consumers.values():
            unknown = sorted(set(consumer.profiles or []) - set(profiles))
            if unknown:
                raise ManifestError(
                    f"{directory / (consumer.id + '.yaml')}: profiles: no such profile "
                    f"{', '.join(unknown)}"
                )
        _check_templates(directory, templates, classes, profiles)
        return cls(extensions, classes, profiles, consumers, owners, templates, packer_files)

    def template(self, name: str) -> TemplateManifest:
        """The logical template `name`, or `NotFound`."""
        try:
            return self.templates[name]
        except KeyError:
            known = ", ".join(sorted(self.templates)) or "none"
            raise NotFound(f"no template {name!r} (extensions/template.*.yaml: {known})") from None

    def consumer_of(self, tenant: str) -> ConsumerManifest | None:
        """The consumer profile that lists `tenant`, if any."""
        owner = self.owners.get(tenant)
        return self.consumers.get(owner) if owner else None

    def owner_of(self, tenant: str) -> str:
        """The consumer a tenant's statuses belong to: the one that lists it, or
        `default`."""
        return self.owners.get(tenant, DEFAULT_OWNER)

    def authorize(self, consumer: str | None, tenant: str) -> None:
        """Raise `Forbidden` unless `consumer` may act for `tenant`. None is the
        publisher of the plain subjects (`sandbox.provision`), which only trusted
        identities may use (an operator, the TTL schedule, a single trusted upstream)."""
        if consumer is None:
            return
        manifest = self.consumers.get(consumer)
        if manifest is None:
            raise Forbidden(f"no consumer {consumer!r} (extensions/consumer.{consumer}.yaml)")
        if self.owners.get(tenant) != consumer:
            raise Forbidden(f"consumer {consumer} may not act for tenant {tenant}")

    def profile(self, profile_id: str) -> Profile:
        """The profile, or `UnknownProfile`."""
        try:
            return self.profiles[profile_id]
        except KeyError:
            raise UnknownProfile(f"unknown profile {profile_id!r}") from None

    def meter_event_model(self, extension_id: str) -> type[MeterEvent]:
        """The exact meter event of an extension (common fields and its own)."""
        model = self._meter_events.get(extension_id)
        if model is None:
            cls = self.adapter_classes[extension_id]
            model = self._meter_events[extension_id] = meter_event_model(
                extension_id, cls.MeterFields
            )
        return model

    def build_adapters(
        self, settings: Settings, nats: Nats | None = None
    ) -> dict[str, SandboxAdapter]:
        """One adapter instance per extension. An adapter whose optional dependency
        (`requires`) is not installed is left out, with a warning: routing then treats
        its extension as not installed. A `config` override from the environment that
        does not validate stops the service like a wrong manifest."""
        adapters = {}
        for ext_id, cls in self.adapter_classes.items():
            if cls.requires and importlib.util.find_spec(cls.requires) is None:
                log.warning(
                    "%s skipped: it needs the %r package (pip install sandboxer[%s])",
                    ext_id,
                    cls.requires,
                    cls.requires,
                )
                continue
            context = AdapterContext(self.extensions[ext_id], settings, nats)
            try:
                context.config(cls.Config, cls.env_prefix)
            except ValidationError as exc:
                where = f"{ext_id}: config from {cls.env_prefix}* variables"
                raise ManifestError(_problems(Path(where), exc, "config.")) from None
            adapters[ext_id] = cls(context)
        return adapters
