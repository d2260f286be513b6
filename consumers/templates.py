"""The template worker: a `template.build` delivery runs Packer once per template
version, then registers its image on every provider the template lists, polling each
build to its end (docs/templates.md).

Every step is recorded in the catalogue before the next, so a repeated, replayed or
redelivered request (a worker killed mid-build) does only what is missing: Packer does
not run again once a version has its digest, a provider that has it ready is not asked
again, and a provider build under way is polled, not started again (adapters register
idempotently on the image's alias besides). Progress goes out on
`template.status.<name>`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

from nats.js import JetStreamContext
from pydantic import ValidationError

from adapters import packer
from adapters.base import (
    Credentials,
    SandboxAdapter,
    TemplateBuildRef,
    TemplateImage,
    TemplateProgress,
)
from consumers.app import Lifeline, Subscription, connect, serve
from consumers.delivery import Delivery, KeepAlive, reject_invalid, settle
from consumers.wiring import Providers, open_providers
from sandboxer.catalogue import Catalogue
from sandboxer.connect import connection_of
from sandboxer.errors import (
    InvalidRequest,
    ProviderRejected,
    TemplateFailed,
    error_info,
)
from sandboxer.settings import Settings
from sandboxer.topology import (
    TEMPLATE_BUILD_SUBJECT,
    TEMPLATE_CONSUMER,
    TEMPLATE_STREAM,
    template_status_subject,
)
from schemas import (
    ProviderTemplate,
    TemplateBuildRequest,
    TemplateEvent,
    TemplateManifest,
    TemplateRecord,
    utcnow,
)

log = logging.getLogger("sandboxer.templates")

#: Request ids a record keeps (the oldest are dropped).
MAX_REQUEST_IDS = 32


def overall_state(record: TemplateRecord, providers: list[str]) -> TemplateRecord:
    """The record with its state derived from its providers': ready when every listed
    one is, failed when none is still building and one failed, building otherwise."""
    states = [record.providers[p].state if p in record.providers else "" for p in providers]
    if all(state == "ready" for state in states):
        state = "ready"
    elif "failed" in states and "building" not in states and "" not in states:
        state = "failed"
    else:
        state = "building"
    return record.model_copy(update={"state": state, "error": None})


class TemplateBuilds:
    """Handles `template.build` deliveries."""

    def __init__(
        self,
        settings: Settings,
        providers: Providers,
        catalogue: Catalogue,
        js: JetStreamContext,
        keepalive: KeepAlive,
    ) -> None:
        self._settings = settings
        self._registry = providers.registry
        self._router = providers.router
        self._catalogue = catalogue
        self._js = js
        self._keepalive = keepalive
        #: One build of a version at a time in this process (others wait, then find
        #: what the first did).
        self._locks: dict[str, asyncio.Lock] = {}

    async def on_build(self, data: bytes, delivery: Delivery) -> None:
        """Handle one delivery of a TemplateBuildRequest."""
        try:
            request = TemplateBuildRequest.model_validate_json(data)
        except ValidationError as exc:
            reason = await reject_invalid(delivery, "TemplateBuildRequest", exc)
            log.warning("template build: invalid request: %s", reason)
            return
        await settle(
            f"template build {request.name}@{request.version or '-'}",
            partial(self._build, request, delivery),
            delivery,
            self._settings,
            give_up=partial(self._give_up, request),
            rejections_answered=True,
        )

    async def _build(self, request: TemplateBuildRequest, delivery: Delivery) -> None:
        manifest = self._registry.template(request.name)
        version = request.version or manifest.version
        if version != manifest.version:
            raise InvalidRequest(
                f"template.{manifest.name} builds version {manifest.version}, not {version} "
                "(a version is built from the HCL as it is now)"
            )
        lock = self._locks.setdefault(manifest.reference, asyncio.Lock())
        async with lock, self._keepalive.watch(delivery):
            record = await self._catalogue.change(
                manifest.name, version, partial(_begin, request, manifest)
            )
            if record.digest is None:
                record = await self._pack(request, manifest)
            await self._tell(request, "packer", f"image {record.image}", record=None)
            results = await asyncio.gather(
                *(self._register(request, manifest, record, ext) for ext in manifest.providers),
                return_exceptions=True,
            )
            record = await self._catalogue.change(
                manifest.name,
                version,
                lambda r: overall_state(_present(r), manifest.providers),
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:  # a transient failure of one provider: the others are recorded
                raise errors[0]
        await self._tell(request, "done", f"{record.reference} is {record.state}", record=record)
        log.info("template %s: %s", record.reference, record.state)

    async def _pack(
        self, request: TemplateBuildRequest, manifest: TemplateManifest
    ) -> TemplateRecord:
        """Run Packer and record its artifact (the first one recorded wins: two
        concurrent builds on two workers register one image)."""
        hcl = self._registry.packer_files[manifest.name]
        if not hcl.is_file():
            raise TemplateFailed(f"template.{manifest.name}: packer: {hcl} not found")
        workdir = Path(tempfile.mkdtemp(prefix=f"sandboxer-template-{manifest.name}-"))
        try:
            artifact = await packer.build(
                hcl,
                {"version": manifest.version, **manifest.variables},
                workdir,
                lambda line: self._tell(request, "packer", line),
                timeout_s=self._settings.template_build_timeout_s,
                binary=self._settings.packer,
                env=self._settings.packer_env,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

        def record_artifact(current: TemplateRecord | None) -> TemplateRecord:
            current = _present(current)
            if current.digest is not None:
                return current
            return current.model_copy(
                update={
                    "image": artifact.image,
                    "digest": artifact.digest,
                    "packer_version": artifact.packer_version,
                    "state": "building",
                }
            )

        return await self._catalogue.change(manifest.name, manifest.version, record_artifact)

    async def _register(
        self,
        request: TemplateBuildRequest,
        manifest: TemplateManifest,
        record: TemplateRecord,
        extension_id: str,
    ) -> None:
        """Bring one provider's copy to `ready` or `failed`, resuming a build under
        way. A provider's refusal or failed build is recorded, not raised; an outage is
        raised (the delivery is retried, and resumes here)."""
        current = record.providers.get(extension_id)
        if current is not None and current.state == "ready":
            await self._tell(request, "register", "ready already", extension_id)
            return
        assert record.image is not None and record.digest is not None
        adapter = self._router.adapter(extension_id)
        credentials = await self._router.platform_credentials(extension_id)
        if credentials is None:
            await self._settle_provider(
                request, manifest, extension_id, None, "failed", "no platform key in OpenBao"
            )
            return
        if current is not None and current.state == "building" and current.template_id:
            ref = TemplateBuildRef(current.template_id, current.build_id)
            await self._tell(request, "register", f"resuming build {ref.build_id}", extension_id)
        else:
            image = TemplateImage(
                name=manifest.name,
                version=manifest.version,
                image=record.image,
                digest=record.digest,
                cpu=manifest.resources.cpu,
                memory_mb=manifest.resources.memory_mb,
                start_cmd=manifest.start_cmd,
                ready_cmd=manifest.ready_cmd,
            )
            try:  # Modal's returns only once its build has ended
                async with asyncio.timeout(self._settings.template_build_timeout_s):
                    ref = await adapter.register_template(image, credentials)
            except TimeoutError:
                reason = "the provider's build took too long"
                await self._settle_provider(request, manifest, extension_id, None, "failed", reason)
                return
            except ProviderRejected as exc:
                await self._settle_provider(
                    request, manifest, extension_id, None, "failed", str(exc)
                )
                return
            await self._settle_provider(request, manifest, extension_id, ref, "building", None)
        progress = await self._poll(request, extension_id, adapter, ref, credentials)
        await self._settle_provider(
            request, manifest, extension_id, ref, progress.state, progress.reason
        )

    async def _poll(
        self,
        request: TemplateBuildRequest,
        extension_id: str,
        adapter: SandboxAdapter,
        ref: TemplateBuildRef,
        credentials: Credentials,
    ) -> TemplateProgress:
        """Poll a provider's build until it is no longer building (or takes too long)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.template_build_timeout_s
        while True:
            progress = await adapter.template_progress(ref, credentials)
            for line in progress.logs:
                await self._tell(request, "register", line, extension_id)
            if progress.state != "building":
                return progress
            if loop.time() > deadline:
                return TemplateProgress("failed", "the provider's build took too long")
            await asyncio.sleep(self._settings.template_poll_s)

    async def _settle_provider(
        self,
        request: TemplateBuildRequest,
        manifest: TemplateManifest,
        extension_id: str,
        ref: TemplateBuildRef | None,
        state: str,
        reason: str | None,
    ) -> None:
        def change(current: TemplateRecord | None) -> TemplateRecord:
            current = _present(current)
            now = utcnow()
            before = current.providers.get(extension_id)
            entry = ProviderTemplate.model_validate(
                {
                    "extension_id": extension_id,
                    "state": state,
                    "template_id": ref.template_id if ref else None,
                    "build_id": ref.build_id if ref else "",
                    "reason": reason[:2000] if reason else None,
                    "started_at": before.started_at if before else now,
                    "updated_at": now,
                }
            )
            return current.model_copy(
                update={"providers": {**current.providers, extension_id: entry}}
            )

        await self._catalogue.change(manifest.name, manifest.version, change)
        said = (
            f"{state}"
            + (f": {reason}" if reason else "")
            + (f" ({ref.template_id})" if ref else "")
        )
        await self._tell(request, "register", said, extension_id)

    async def _tell(
        self,
        request: TemplateBuildRequest,
        step: str,
        message: str,
        extension_id: str | None = None,
        *,
        record: TemplateRecord | None = None,
    ) -> None:
        event = TemplateEvent.model_validate(
            {
                "request_id": request.request_id,
                "name": request.name,
                "version": request.version or (record.version if record else None),
                "step": step,
                "extension_id": extension_id,
                "message": message[:4000],
                "record": record,
                "at": utcnow(),
            }
        )
        await self._js.publish(
            template_status_subject(request.name), event.model_dump_json().encode()
        )

    async def _give_up(self, request: TemplateBuildRequest, exc: Exception) -> None:
        """Record why a build ended without a usable image, and tell the asker."""
        error = error_info(exc)
        log.warning("template build %s failed: %s: %s", request.name, error.code, error.message)
        manifest = self._registry.templates.get(request.name)
        record = None
        if manifest is not None and (request.version or manifest.version) == manifest.version:
            found = await self._catalogue.get(manifest.name, manifest.version)
            if found is not None and not isinstance(exc, InvalidRequest):

                def failed(current: TemplateRecord | None) -> TemplateRecord:
                    current = _present(current)
                    if current.digest is not None:  # providers' states stand
                        return current
                    return current.model_copy(update={"state": "failed", "error": error})

                record = await self._catalogue.change(manifest.name, manifest.version, failed)
        await self._tell(request, "done", f"{error.code}: {error.message}", record=record)


def _present(record: TemplateRecord | None) -> TemplateRecord:
    if record is None:  # only if an operator deleted it mid-build
        raise TemplateFailed("the template's catalogue entry vanished during the build")
    return record


def _begin(
    request: TemplateBuildRequest, manifest: TemplateManifest, current: TemplateRecord | None
) -> TemplateRecord:
    """The record at the start of a build: new (`packing`), or the one there with this
    request remembered."""
    now = utcnow()
    if current is None:
        return TemplateRecord(
            name=manifest.name,
            version=manifest.version,
            state="packing",
            request_ids=[request.request_id],
            created_at=now,
            updated_at=now,
        )
    ids = current.request_ids
    if request.request_id not in ids:
        ids = [*ids, request.request_id][-MAX_REQUEST_IDS:]
    state = current.state if current.digest is not None else "packing"
    return current.model_copy(update={"request_ids": ids, "state": state, "error": None})


async def run_template_worker(
    settings: Settings,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the template worker until `stop` is set (or SIGTERM/SIGINT), then drain (a
    build cut off is redelivered and resumes from the catalogue)."""
    async with AsyncExitStack() as stack:
        lifeline = Lifeline("sandboxer-templates")
        js = await connect(settings, lifeline, stack)
        providers = await open_providers(settings, stack, connection_of(js))
        keepalive = KeepAlive.for_ack_wait(settings, closed_by=stack)
        builds = TemplateBuilds(settings, providers, Catalogue(js), js, keepalive)
        subscription = Subscription(
            TEMPLATE_STREAM,
            TEMPLATE_CONSUMER,
            (TEMPLATE_BUILD_SUBJECT,),
            builds.on_build,
            settings.max_deliver + 2,
        )
        await serve(lifeline, js, [subscription], settings, stop or asyncio.Event(), ready)
