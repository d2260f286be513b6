"""`ext.modal`: sandboxes on Modal, through the official `modal` client (the optional
`sandboxer[modal]` extra). Modal has no public REST API: the client speaks gRPC to
`MODAL_SERVER_URL` (default Modal's own). Its RPCs are described in
docs/research/modal-client.md.

- Credentials are per request (BYOK or the platform's token id and secret). One
  `modal.Client` is kept per credential, at most `config.max_clients` (least recently
  used ones are closed), and all are closed on shutdown. Only the async API (`.aio`)
  is used: the blocking one inside an event loop is a known source of hangs.
- Idempotency: Modal has no idempotency key across calls, but a sandbox's `name` is
  unique among the running sandboxes of an app. The sandbox id is the name, so a
  create repeated after a lost answer gets `AlreadyExistsError`, and the adapter returns
  the sandbox it finds by its tags.
- What the price depends on (cores, memory, GPU) and the start time are kept in the
  sandbox's own tags, so a sandbox found after a crash can be metered like any other.
- Templates are Modal images built from the registry reference
  (`Image.from_registry(...).build()`), kept by their `im-…` id (`Image.from_id` at
  create). Modal keys a build by its definition, so registering the same image again,
  or again after a worker died mid-build, joins or reuses the one build.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.base import (
    TAG_SANDBOX_ID,
    AdapterContext,
    Credentials,
    Grant,
    ProviderSandbox,
    Reach,
    SandboxAdapter,
    SandboxSpec,
    TemplateBuildRef,
    TemplateImage,
    TemplateProgress,
    TemplateState,
    Usage,
)
from adapters.shared import ProviderConfig, metered_usage, redact
from sandboxer.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderUnavailable,
    SandboxerError,
)
from sandboxer.money import gib
from schemas import (
    Credential,
    Endpoint,
    Factor,
    Port,
    Profile,
    Seconds,
    UsdRate,
    quantize_usd,
    utcnow,
)

if TYPE_CHECKING:
    import modal

log = logging.getLogger("sandboxer.modal")
# hpack and h2 (under grpclib, under modal) log every HTTP/2 header at DEBUG, Modal's
# token secret among them: never let them, whatever the root level.
for _noisy in ("hpack", "h2"):
    logging.getLogger(_noisy).setLevel(logging.INFO)

#: Tags on every Modal sandbox besides the three of every provider.
TAG_CPU = "sandboxer_cpu_cores"
TAG_MEMORY = "sandboxer_memory_mb"
TAG_GPU = "sandboxer_gpu"  # "H100:1", or "" for none
TAG_STARTED = "sandboxer_started_at"


class ModalRates(BaseModel):
    """`pricing.rates` of ext.modal: per CPU core, GiB of memory and GPU, per second.
    In the manifest, GPU rates are flat keys `gpu.<TYPE>` (`gpu.H100: "0.001097"`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_cpu_core_second: UsdRate
    usd_per_gib_second: UsdRate
    gpu_usd_per_second: dict[str, UsdRate] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _gpu_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            gpus = {k.removeprefix("gpu."): v for k, v in data.items() if k.startswith("gpu.")}
            rest = {k: v for k, v in data.items() if not k.startswith("gpu.")}
            return {**rest, "gpu_usd_per_second": {**rest.get("gpu_usd_per_second", {}), **gpus}}
        return data

    def per_second(self, cpu_cores: Decimal, memory_mb: int, gpu: str | None, gpus: int) -> Decimal:
        """USD per second of a sandbox with these resources (before any multiplier)."""
        price = cpu_cores * self.usd_per_cpu_core_second
        price += gib(memory_mb) * self.usd_per_gib_second
        if gpu and gpus:
            price += gpus * self.gpu_rate(gpu)
        return price

    def gpu_rate(self, gpu: str) -> Decimal:
        try:
            return self.gpu_usd_per_second[gpu]
        except KeyError:
            priced = ", ".join(sorted(self.gpu_usd_per_second))
            raise ProviderRejected(
                f"ext.modal: no price for GPU type {gpu!r} in the manifest; priced: {priced}"
            ) from None


class ModalMeterFields(BaseModel):
    """What a Modal sandbox is billed on: CPU cores, memory and GPUs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_cores: Seconds
    memory_mb: int = Field(ge=1)
    gpu_type: str | None = Field(default=None, max_length=32)
    gpu_count: int = Field(default=0, ge=0)


class ModalConfig(ProviderConfig):
    """`config` of ext.modal; `max_timeout_s` is Modal's longest sandbox life (24 h)."""

    #: The Modal app the sandboxes belong to (created if missing).
    app_name: str = Field(default="sandboxer", pattern=r"^[A-Za-z0-9._-]{1,63}$")
    #: Modal environment; None: the workspace's default.
    environment: str | None = None
    #: Image when neither request nor profile names one: a registry tag, or `im-...`.
    image: str = "python:3.12-slim"
    #: Seconds without activity after which Modal stops a sandbox; None: never.
    idle_timeout_s: int | None = Field(default=None, ge=1)
    max_timeout_s: int = Field(default=24 * 3600, ge=1, le=24 * 3600)
    #: Modal's surcharge when a region is pinned (1.25 to 2.5); 1: none.
    region_multiplier: Factor = Decimal(1)
    #: Clients kept open (one per credential); the least recently used are closed.
    max_clients: int = Field(default=64, ge=1)
    #: How long `ready` waits for a started sandbox's tunnels.
    tunnel_timeout_s: float = Field(default=50.0, gt=0)
    #: Modal's tunnels speak TLS; the fake of `sandboxer dev`, plain HTTP on loopback
    #: (`SANDBOXER_MODAL_TUNNEL_SCHEME=http`).
    tunnel_scheme: Literal["https", "http"] = "https"


#: Protocols of a port Modal serves through a TLS tunnel.
_TLS = frozenset({"http", "https", "wss"})
#: Last build log lines put in a failed build's reason: Modal's own message names no
#: cause (its result carries one only for a function step), the log does.
_REASON_LOG_LINES = 3


@dataclasses.dataclass
class _Registration:
    """What this process knows of one registered image: how its build ended, and the
    build log lines not handed out yet (None: not read yet)."""

    state: TemplateState
    reason: str | None = None
    unread_logs: tuple[str, ...] | None = None


def _template_commands(image: TemplateImage) -> list[str]:
    """The Dockerfile lines after `FROM <image.image>`, in that one layer (one build):

    - a label with the alias, so the definition is the template's own: Modal reuses a
      build by its definition, and `FROM repo:tag` alone would keep serving the first
      build after the tag moved to another digest (another alias);
    - the start command as `CMD`, which Modal runs as a sandbox's main process when the
      create names none (`Image.cmd`: "Used with modal.Sandbox"), as `provision` does.

    A readiness check is no part of a Modal image (`readiness_probe` is an option of each
    create, and a create is given only the image id), so `ready_cmd` is not carried."""
    commands = [f"LABEL sandboxer.template={json.dumps(image.alias)}"]
    if image.start_cmd:
        commands.append(f"CMD {json.dumps(['sh', '-c', image.start_cmd])}")
    return commands


def _key_of(credentials: Credentials) -> tuple[str, str]:
    token_id, secret = credentials.values.get("token_id"), credentials.values.get("token_secret")
    if not token_id or not secret:
        raise ProviderRejected("ext.modal: the credentials lack token_id or token_secret")
    return token_id, secret


def _workspace_of(credentials: Credentials) -> str:
    """What the state kept per credential is keyed by (a hash: never the secret)."""
    token_id, secret = _key_of(credentials)
    return hashlib.sha256(f"{token_id}\0{secret}".encode()).hexdigest()


def _error_text(what: str, exc: BaseException, credentials: Credentials) -> str:
    return redact(f"ext.modal: {what}: {type(exc).__name__}: {exc}", credentials)[:900]


def _translate(
    what: str, exc: BaseException, credentials: Credentials, *, creating: bool
) -> SandboxerError:
    """Modal's exception as one of ours: refusals (safe to fall back) or ambiguous."""
    from modal import exception as mx

    message = _error_text(what, exc, credentials)
    if isinstance(exc, mx.AuthError | mx.PermissionDeniedError):
        return ProviderRejected(f"{message}; the token was refused")
    if isinstance(exc, mx.ConflictError):  # made, then finished or refused: may exist
        return ProviderFailed(message)
    if isinstance(exc, mx.ImageBuildError):  # the image, not the sandbox: none was made
        return ProviderRejected(message) if creating else ProviderFailed(message)
    if isinstance(exc, mx.ResourceExhaustedError | mx.InvalidError | mx.NotFoundError):
        # quota, an invalid GPU or image, no such app/environment: nothing was made
        return ProviderRejected(message) if creating else ProviderFailed(message)
    # Deadlines, unavailability, internal errors, lost connections: the create may
    # have happened. Retried (the name finds it), never a fallback.
    return ProviderUnavailable(message)


class ModalAdapter(SandboxAdapter):
    """Modal sandboxes through the official client."""

    extension_id: ClassVar[str] = "ext.modal"
    Rates: ClassVar[type[BaseModel]] = ModalRates
    Config: ClassVar[type[BaseModel]] = ModalConfig
    MeterFields: ClassVar[type[BaseModel]] = ModalMeterFields
    requires: ClassVar[str | None] = "modal"
    env_prefix: ClassVar[str | None] = "SANDBOXER_MODAL_"
    serves_ports: ClassVar[bool] = True
    builds_templates: ClassVar[bool] = True

    def __init__(self, context: AdapterContext) -> None:
        self.rates = context.rates(ModalRates)
        self.config = context.config(ModalConfig, self.env_prefix)
        self._clients: OrderedDict[str, modal.Client] = OrderedDict()
        self._apps: dict[str, modal.App] = {}
        self._lock = asyncio.Lock()
        #: (workspace, image id) -> what a registration of this process learnt.
        self._registrations: dict[tuple[str, str], _Registration] = {}

    # -- the seam ---------------------------------------------------------------------

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        import modal
        from modal import exception as mx

        ports = tuple(spec.profile.ports)
        refused = [p.port for p in ports if p.protocol == "tcp" and not p.public]
        if refused:  # before anything is made: Modal's connect proxy speaks HTTP only
            raise ProviderRejected(f"ext.modal: private raw TCP ports cannot be served ({refused})")
        client, app = await self._session(credentials)
        resources = spec.profile.resources
        gpu = self._gpu(spec.profile)
        started = utcnow()
        tags = {
            **spec.tags,
            TAG_CPU: str(resources.cpu),
            TAG_MEMORY: str(resources.memory_mb),
            TAG_GPU: gpu or "",
            TAG_STARTED: started.isoformat(),
        }
        try:
            sandbox = await modal.Sandbox.create.aio(
                app=app,
                name=spec.sandbox_id,
                image=self._image(spec.template, client),
                gpu=gpu,
                cpu=float(resources.cpu),
                memory=resources.memory_mb,
                timeout=self.config.timeout_s(spec.ttl_s),
                idle_timeout=self.config.idle_timeout_s,
                tags=tags,
                client=client,
                # Only public ports get a tunnel (anyone with its URL reaches it);
                # private ones are reached through Modal's connect tokens.
                encrypted_ports=[p.port for p in ports if p.public and p.protocol in _TLS],
                h2_ports=[p.port for p in ports if p.public and p.protocol == "h2"],
                unencrypted_ports=[p.port for p in ports if p.public and p.protocol == "tcp"],
            )
        except mx.AlreadyExistsError:
            # Made by an earlier attempt whose answer was lost: that one is ours.
            found = await self._by_sandbox_id(spec.sandbox_id, credentials)
            if found is None:
                raise ProviderUnavailable(
                    f"ext.modal: {spec.sandbox_id} exists but is not listed yet"
                ) from None
            return dataclasses.replace(found, ports=ports)
        except Exception as exc:
            raise _translate("create", exc, credentials, creating=True) from None
        return ProviderSandbox(
            sandbox.object_id, tags, True, started, self._fields(tags), ports=ports
        )

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        handle = await self._handle(sandbox.provider_sandbox_id, credentials)
        if handle is None:
            raise ProviderFailed(f"ext.modal: sandbox {sandbox.provider_sandbox_id} is gone")
        try:
            code = await handle.poll.aio()  # None: still running
            tags = sandbox.tags or await handle.get_tags.aio()
        except Exception as exc:
            raise _translate("poll", exc, credentials, creating=False) from None
        if code is not None:
            raise ProviderFailed(
                f"ext.modal: sandbox {sandbox.provider_sandbox_id} exited with code {code}"
            )
        ready = self._sandbox(sandbox.provider_sandbox_id, tags)
        endpoints = await self._endpoints(handle, sandbox.ports, credentials)
        return dataclasses.replace(ready, ports=sandbox.ports, endpoints=endpoints)

    async def connect(self, reach: Reach, credentials: Credentials) -> Grant:
        handle = await self._handle(reach.provider_sandbox_id, credentials)
        if handle is None:
            raise ProviderFailed(f"ext.modal: sandbox {reach.provider_sandbox_id} is gone")
        # Modal's proxy hands the sandbox this, unspoofable, as X-Verified-User-Data.
        who = {"tenant": reach.tenant, "sandbox_id": reach.sandbox_id, "requester": reach.requester}
        granted = []
        for endpoint in reach.endpoints:
            if reach.port not in (None, endpoint.port):
                continue
            if endpoint.public:
                granted.append(
                    Credential(
                        port=endpoint.port,
                        url=endpoint.url,
                        host=endpoint.host,
                        host_port=endpoint.host_port,
                        auth="none",
                    )
                )
                continue
            try:
                minted = await handle.create_connect_token.aio(
                    user_metadata=json.dumps(who, sort_keys=True), port=endpoint.port
                )
            except Exception as exc:
                raise _translate("connect token", exc, credentials, creating=False) from None
            granted.append(
                Credential(
                    port=endpoint.port,
                    url=minted.url,
                    auth="bearer",
                    secret=minted.token,
                    expires_at=reach.expires_at,  # Modal's tokens name no expiry
                )
            )
        return Grant(granted)

    async def _endpoints(
        self, handle: Any, ports: tuple[Port, ...], credentials: Credentials
    ) -> tuple[Endpoint, ...]:
        """Each port's endpoint: a public one's tunnel (resolved once the sandbox runs),
        a private one's connect proxy (its URL comes with the token)."""
        tunnels: dict[int, Any] = {}
        if any(p.public for p in ports):
            try:
                tunnels = await handle.tunnels.aio(timeout=self.config.tunnel_timeout_s)
            except Exception as exc:
                raise _translate("tunnels", exc, credentials, creating=False) from None
        endpoints = []
        for port in ports:
            if not port.public:
                endpoints.append(
                    Endpoint(port=port.port, protocol=port.protocol, public=False, auth="bearer")
                )
                continue
            tunnel = tunnels.get(port.port)
            if tunnel is None:
                raise ProviderUnavailable(f"ext.modal: no tunnel for port {port.port} yet")
            endpoints.append(self._tunnel_endpoint(port, tunnel))
        return tuple(endpoints)

    def _tunnel_endpoint(self, port: Port, tunnel: Any) -> Endpoint:
        if port.protocol == "tcp":
            host, host_port = tunnel.unencrypted_host, tunnel.unencrypted_port
            url = None
        else:
            host, host_port = tunnel.host, tunnel.port
            scheme = "wss" if port.protocol == "wss" else "https"
            if self.config.tunnel_scheme == "http":
                scheme = "ws" if port.protocol == "wss" else "http"
            url = f"{scheme}://{host}" + ("" if host_port == 443 else f":{host_port}")
        return Endpoint(
            port=port.port,
            protocol=port.protocol,
            public=True,
            url=url,
            host=host,
            host_port=host_port,
        )

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        handle = await self._handle(provider_sandbox_id, credentials)
        if handle is None:
            return  # gone already
        try:
            await handle.terminate.aio()  # a finished sandbox: a no-op
        except Exception as exc:
            from modal import exception as mx

            if isinstance(exc, mx.NotFoundError):
                return
            raise _translate("terminate", exc, credentials, creating=False) from None

    def estimate_cost(self, profile: Profile, ttl_s: int) -> Decimal:
        resources = profile.resources
        seconds = Decimal(self.config.timeout_s(ttl_s))
        per_second = self.rates.per_second(
            Decimal(resources.cpu), resources.memory_mb, resources.gpu, self._gpu_count(profile)
        )
        return quantize_usd(per_second * self.config.region_multiplier * seconds)

    def meter_actual(self, sandbox: ProviderSandbox, stopped_at: datetime) -> Usage:
        fields = ModalMeterFields.model_validate(sandbox.meter_fields)
        per_second = self.rates.per_second(
            fields.cpu_cores, fields.memory_mb, fields.gpu_type, fields.gpu_count
        )
        # Modal stops a sandbox at its timeout: nothing is billed beyond the cap.
        return metered_usage(
            sandbox,
            stopped_at,
            per_second * self.config.region_multiplier,
            fields=fields.model_dump(),
            max_s=self.config.max_timeout_s,
        )

    async def find(
        self, tags: Mapping[str, str], credentials: Credentials
    ) -> list[ProviderSandbox]:
        import modal

        client, app = await self._session(credentials)
        found = []
        try:
            async for handle in modal.Sandbox.list.aio(
                app_id=app.app_id, tags=dict(tags), client=client
            ):
                own = await handle.get_tags.aio()
                if tags.items() <= own.items():  # never trust a filter with another's
                    found.append(self._sandbox(handle.object_id, own))
        except Exception as exc:
            raise _translate("list", exc, credentials, creating=False) from None
        return found

    async def register_template(
        self, image: TemplateImage, credentials: Credentials
    ) -> TemplateBuildRef:
        """Build `image.image` as a Modal image, and return once the build ended: the
        client tells the image id only then. A build Modal has of the same definition
        is reused (built) or joined (under way, as after a worker died mid-build), never
        repeated. A failed build is returned too; `template_progress` reports it."""
        import modal
        from modal import exception as mx

        _, app = await self._session(credentials)  # the app's client builds
        definition = modal.Image.from_registry(
            image.image, setup_dockerfile_commands=_template_commands(image)
        )
        try:
            await definition.build.aio(app)
        except mx.ImageBuildError as exc:
            image_id = exc.image_id
            registration = await self._failed_build(definition, exc, credentials)
        except Exception as exc:
            raise _translate("image build", exc, credentials, creating=True) from None
        else:
            image_id, registration = definition.object_id, _Registration("ready")
        self._registrations[(_workspace_of(credentials), image_id)] = registration
        return TemplateBuildRef(template_id=image_id)

    async def template_progress(
        self, ref: TemplateBuildRef, credentials: Credentials
    ) -> TemplateProgress:
        """How the build of `ref` ended (it has: `register_template` waits for it), with
        its log lines the first time. After a restart, Modal's word: an image it can load
        is built."""
        import modal

        key = (_workspace_of(credentials), ref.template_id)
        registration = self._registrations.get(key)
        if registration is None:
            registration = await self._image_state(ref.template_id, credentials)
            self._registrations[key] = registration
        logs = registration.unread_logs
        if logs is None:
            client, _ = await self._session(credentials)
            image = modal.Image.from_id(ref.template_id, client=client)
            logs = await self._build_logs(image, credentials)
        registration.unread_logs = None if logs is None else ()  # unreadable: next poll
        return TemplateProgress(registration.state, registration.reason, logs or ())

    async def aclose(self) -> None:
        clients, self._clients, self._apps = list(self._clients.values()), OrderedDict(), {}
        for client in clients:
            await client.close.aio()

    # -- helpers ----------------------------------------------------------------------

    async def _session(self, credentials: Credentials) -> tuple[modal.Client, modal.App]:
        """The client of these credentials (opened once, kept while used) and the app."""
        import modal

        token_id, secret = _key_of(credentials)
        key = _workspace_of(credentials)
        async with self._lock:
            client = self._clients.get(key)
            try:
                if client is None:
                    client = await modal.Client.from_credentials.aio(token_id, secret)
                    self._clients[key] = client
                    await self._evict()
                self._clients.move_to_end(key)
                if key not in self._apps:
                    self._apps[key] = await modal.App.lookup.aio(
                        self.config.app_name,
                        create_if_missing=True,
                        client=client,
                        environment_name=self.config.environment,
                    )
            except Exception as exc:
                raise _translate("connect", exc, credentials, creating=True) from None
            return client, self._apps[key]

    async def _evict(self) -> None:
        while len(self._clients) > self.config.max_clients:
            key, client = self._clients.popitem(last=False)
            self._apps.pop(key, None)
            await client.close.aio()

    async def _handle(self, provider_sandbox_id: str, credentials: Credentials) -> Any:
        """The client's handle of a sandbox, or None if Modal does not know it."""
        import modal
        from modal import exception as mx

        client, _ = await self._session(credentials)
        try:
            return await modal.Sandbox.from_id.aio(provider_sandbox_id, client=client)
        except mx.NotFoundError:
            return None
        except Exception as exc:
            raise _translate("get", exc, credentials, creating=False) from None

    async def _image_state(self, image_id: str, credentials: Credentials) -> _Registration:
        """Whether Modal has `image_id` built: loading it (`ImageFromId`) succeeds only
        then, and a failed or deleted build is not found."""
        import modal
        from modal import exception as mx

        if not image_id.startswith("im-"):
            raise ProviderRejected(f"ext.modal: {image_id!r} is not a Modal image id")
        client, app = await self._session(credentials)
        try:
            await modal.Image.from_id(image_id, client=client).build.aio(app)
        except mx.NotFoundError as exc:
            return _Registration("failed", _error_text("image", exc, credentials))
        except Exception as exc:
            raise _translate("image", exc, credentials, creating=False) from None
        return _Registration("ready")

    async def _failed_build(
        self, definition: modal.Image, exc: Exception, credentials: Credentials
    ) -> _Registration:
        """A failed build: Modal's message, and the cause from the last lines of its log."""
        logs = await self._build_logs(definition, credentials)
        tail = " | ".join((logs or ())[-_REASON_LOG_LINES:])
        reason = _error_text("image build", exc, credentials)
        return _Registration("failed", reason + (f"; build log: {tail}" if tail else ""), logs)

    @staticmethod
    async def _build_logs(image: modal.Image, credentials: Credentials) -> tuple[str, ...] | None:
        """The lines of every build step of `image`, or None if Modal cannot tell them
        now: a registration never fails for want of its logs."""
        try:
            entries = [entry async for entry in image.logs.fetch.aio(layers=None)]
        except Exception as exc:
            log.warning("%s", _error_text("build logs", exc, credentials))
            return None
        return tuple(
            redact(line, credentials)
            for entry in entries
            for line in entry.message.splitlines()
            if line.strip()
        )

    async def _by_sandbox_id(
        self, sandbox_id: str, credentials: Credentials
    ) -> ProviderSandbox | None:
        found = await self.find({TAG_SANDBOX_ID: sandbox_id}, credentials)
        return next((s for s in found if s.running), None)

    def _image(self, template: str | None, client: modal.Client) -> modal.Image:
        import modal

        name = template or self.config.image
        if name.startswith("im-"):
            return modal.Image.from_id(name, client=client)
        return modal.Image.from_registry(name)

    @staticmethod
    def _gpu_count(profile: Profile) -> int:
        resources = profile.resources
        return max(resources.gpu_count, 1) if resources.gpu else 0

    def _gpu(self, profile: Profile) -> str | None:
        """Modal's `gpu=` for the profile: `H100`, or `H100:2`; None for CPU only."""
        gpu = profile.resources.gpu
        if not gpu:
            return None
        self.rates.gpu_rate(gpu)  # refuse an unpriced GPU before anything is made
        count = self._gpu_count(profile)
        return gpu if count == 1 else f"{gpu}:{count}"

    @staticmethod
    def _fields(tags: Mapping[str, str]) -> dict[str, Any]:
        gpu, _, count = (tags.get(TAG_GPU) or "").partition(":")
        return {
            "cpu_cores": Decimal(tags.get(TAG_CPU) or "0"),
            "memory_mb": int(tags.get(TAG_MEMORY) or 0),
            "gpu_type": gpu or None,
            "gpu_count": (int(count) if count else 1) if gpu else 0,
        }

    def _sandbox(self, provider_sandbox_id: str, tags: Mapping[str, str]) -> ProviderSandbox:
        started = tags.get(TAG_STARTED)
        return ProviderSandbox(
            provider_sandbox_id=provider_sandbox_id,
            tags=dict(tags),
            running=True,
            started_at=datetime.fromisoformat(started) if started else utcnow(),
            meter_fields=self._fields(tags),
        )
