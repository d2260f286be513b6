"""Logical templates: one sandbox image, built once by Packer and registered on every
provider that routes it (docs/templates.md).

`extensions/template.<name>.yaml` is a `TemplateManifest`; a `TemplateBuildRequest` on
`template.build` asks the template worker to build it; the catalogue (KV
`sandboxer-templates`, key `<name>.<version>`) keeps one `TemplateRecord` per version,
with each provider's own template id and state; `TemplateEvent`s on
`template.status.<name>` tell a build's progress.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import ExtensionId, RequestId, Timestamp
from schemas.manifest import Resources
from schemas.status import ErrorInfo

#: A logical template's name: a subject token and the start of a KV key.
TemplateName = Annotated[str, Field(min_length=1, max_length=48, pattern=r"^[a-z0-9][a-z0-9-]*$")]
#: Its version: `1.0.0`, `2026-12-01`, `3`.
TemplateVersion = Annotated[
    str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
#: The content digest of a built image.
Digest = Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]

#: Where one provider's registration stands.
ProviderTemplateState = Literal["building", "ready", "failed"]
#: Where a whole template version stands: Packer running, registrations under way, ready
#: on every listed provider, or failed (Packer failed, or some provider did).
TemplateState = Literal["packing", "building", "ready", "failed"]


def logical_template(value: str | None) -> tuple[str, str] | None:
    """(name, version) of a `<name>@<version>` reference; None for a provider's own
    template name (no `@`) or none at all."""
    if not value or "@" not in value:
        return None
    name, _, version = value.partition("@")
    return name, version


class TemplateManifest(BaseModel):
    """`extensions/template.<name>.yaml`: what to build, with what, and where it must be
    registered. A profile uses it as `template: <name>@<version>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["template"]
    id: str = Field(max_length=57, pattern=r"^template\.[a-z0-9][a-z0-9-]*$")
    description: str = Field(default="", max_length=2000)
    version: TemplateVersion
    packer: str = Field(
        max_length=256,
        description="The Packer HCL file, relative to this manifest's folder.",
    )
    variables: dict[str, str] = Field(
        default_factory=dict, max_length=32, description="More `-var` values for Packer."
    )
    resources: Resources = Field(default_factory=Resources)
    start_cmd: str | None = Field(default=None, max_length=1024)
    ready_cmd: str | None = Field(default=None, max_length=1024)
    providers: list[ExtensionId] = Field(min_length=1, max_length=16)

    @property
    def name(self) -> str:
        return self.id.removeprefix("template.")

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"


class TemplateBuildRequest(BaseModel):
    """Build a template version and register it everywhere it is listed. Idempotent: a
    version already built is not built again, and a provider that has it ready is not
    asked again; only what is missing or failed is done."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    request_id: RequestId
    name: TemplateName
    version: TemplateVersion | None = Field(
        default=None, description="The manifest's version if omitted (the only one it builds)."
    )
    requested_by: str = Field(default="", max_length=128)


class ProviderTemplate(BaseModel):
    """One provider's copy of a template version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    extension_id: ExtensionId
    state: ProviderTemplateState
    #: What a create on that provider takes (E2B's template id, Modal's `im-…`).
    template_id: str | None = Field(default=None, max_length=256)
    #: The provider's build to poll while `building` (kept so a restart resumes it).
    build_id: str = Field(default="", max_length=256)
    reason: str | None = Field(default=None, max_length=2000)
    started_at: Timestamp
    updated_at: Timestamp


class TemplateRecord(BaseModel):
    """The catalogue's entry for one template version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    name: TemplateName
    version: TemplateVersion
    state: TemplateState
    #: Packer's artifact: the pullable reference (pinned to its digest) and the digest.
    image: str | None = Field(default=None, max_length=512)
    digest: Digest | None = None
    packer_version: str | None = Field(default=None, max_length=32)
    providers: dict[str, ProviderTemplate] = Field(default_factory=dict)
    #: The build requests that worked on it, oldest first (at most 32 kept).
    request_ids: list[RequestId] = Field(default_factory=list, max_length=32)
    error: ErrorInfo | None = None
    created_at: Timestamp
    updated_at: Timestamp

    @property
    def reference(self) -> str:
        return f"{self.name}@{self.version}"

    def ready_on(self, extension_id: str) -> str | None:
        """The provider's template id, if the template is ready there."""
        found = self.providers.get(extension_id)
        return found.template_id if found and found.state == "ready" else None

    def why_not_ready(self, extension_id: str) -> str:
        """Why a route on `extension_id` cannot use it (for `template_not_ready`)."""
        found = self.providers.get(extension_id)
        if found is None:
            return f"{self.reference} is not registered on {extension_id}"
        if found.state == "failed":
            return f"{self.reference} failed on {extension_id}: {found.reason or 'no reason given'}"
        return f"{self.reference} is still {found.state} on {extension_id}"


class TemplateEvent(BaseModel):
    """A step of a build, on `template.status.<name>`: Packer's output, a provider's
    progress, and at the end the record as the catalogue keeps it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    request_id: RequestId
    name: TemplateName
    version: TemplateVersion | None = None
    step: Literal["packer", "register", "done"]
    extension_id: ExtensionId | None = None
    message: str = Field(default="", max_length=4000)
    record: TemplateRecord | None = None
    at: Timestamp
