"""`ext.e2b`: sandboxes on E2B, through its control-plane REST API.

One `httpx.AsyncClient` serves the whole worker (pooled connections); the API key goes
per request in `X-API-KEY`, because with BYOK it differs per tenant. Paths, fields and
status codes are the ones the official `e2b` SDK uses (docs/research/e2b-sdk.md).

Every call is safe to repeat: reads and deletes by nature, creates because they carry
an `Idempotency-Key` derived from the sandbox id, a template's build request because a
newer one supersedes the unstarted one it repeats, and a build's start because E2B
refuses to start one twice. So lost connections are retried like 429s and 502/503/504,
with capped jittered backoff (honouring `Retry-After`), unless E2B answers
`Should-Retry: false`.

Templates are built from an OCI image as the SDK's `AsyncTemplate.build` does it: the
alias is looked up (`GET /templates/aliases/{alias}`), a build is requested under it
(`POST /v3/templates`) and started from the image (`POST /v2/templates/{id}/builds/
{buildID}`), and its status polled (`GET /templates/{id}/builds/{buildID}/status`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import math
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import quote, urlencode

from pydantic import BaseModel, ConfigDict, Field

from adapters.base import (
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
from adapters.shared import ProviderConfig, backoff_s, metered_usage, redact
from sandboxer import observe
from sandboxer.errors import (
    ProviderFailed,
    ProviderRejected,
    ProviderUnavailable,
    SandboxerError,
)
from sandboxer.money import gib
from schemas import (
    ControlEndpoint,
    Credential,
    Endpoint,
    Port,
    Profile,
    UsdRate,
    quantize_usd,
    utcnow,
)

if TYPE_CHECKING:  # imported when first used: a worker that never calls E2B saves ~8 MiB
    import httpx

log = logging.getLogger("sandboxer.e2b")

#: E2B answers these with `Should-Retry` absent when a retry may succeed (as the SDK).
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
#: `error_code`s after which a create may or may not have happened.
AMBIGUOUS_ERROR_CODES = frozenset({"idempotency_outcome_unknown", "idempotency_request_mismatch"})
#: `error_code`s that only mean "not yet".
TRANSIENT_ERROR_CODES = frozenset({"idempotency_in_progress", "sandbox_capacity_unavailable"})
#: The header a private sandbox's ports want its traffic access token in.
TRAFFIC_HEADER = "e2b-traffic-access-token"
#: envd, the sandbox's own control API (commands, files), and its token's header.
ENVD_PORT = 49983
ENVD_HEADER = "X-Access-Token"
#: A template build's E2B status, as the seam names it (`waiting`: not started yet).
BUILD_STATES: Mapping[str, TemplateState] = {
    "waiting": "building",
    "building": "building",
    "ready": "ready",
    "error": "failed",
}
#: The most log entries E2B gives in one status answer.
MAX_LOG_ENTRIES = 100


class E2BRates(BaseModel):
    """`pricing.rates` of ext.e2b: allocated vCPU and memory, per running second."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    usd_per_vcpu_second: UsdRate
    usd_per_gib_second: UsdRate

    def per_second(self, cpu_count: int, memory_mb: int) -> Decimal:
        """USD per second of a sandbox with `cpu_count` vCPUs and `memory_mb` MiB."""
        return cpu_count * self.usd_per_vcpu_second + gib(memory_mb) * self.usd_per_gib_second

    def cost(self, cpu_count: int, memory_mb: int, seconds: Decimal) -> Decimal:
        """The price of `seconds` of such a sandbox, exact to the micro-dollar."""
        return quantize_usd(self.per_second(cpu_count, memory_mb) * seconds)


class E2BMeterFields(BaseModel):
    """What an E2B sandbox is billed on: its allocated vCPUs and memory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_count: int = Field(ge=1)
    memory_mb: int = Field(ge=1)


class E2BConfig(ProviderConfig):
    """`config` of ext.e2b; `SANDBOXER_E2B_<FIELD>` overrides a field
    (`SANDBOXER_E2B_API_URL`, say). `max_timeout_s` is the plan's longest sandbox
    life (Hobby 1 h, Pro 24 h)."""

    #: The control plane.
    api_url: str = "https://api.e2b.app"
    #: Template used when neither the request nor the profile names one.
    template: str = "base"
    #: Environment variables set in every sandbox (never secrets: they are not redacted).
    env_vars: dict[str, str] = Field(default_factory=dict)
    request_timeout_s: float = Field(default=60.0, gt=0)
    #: Tries per call before the failure goes back to JetStream for a later delivery.
    max_attempts: int = Field(default=4, ge=1, le=10)
    backoff_s: float = Field(default=0.2, ge=0)
    backoff_cap_s: float = Field(default=10.0, ge=0)
    #: A `Retry-After` longer than this is not slept on inside a handler.
    max_retry_after_s: float = Field(default=30.0, ge=0)
    max_connections: int = Field(default=100, ge=1)
    #: The sandboxes' domain when E2B's answer names none.
    domain: str = Field(default="e2b.app", max_length=200)
    #: How ports are reached: E2B's edge speaks TLS; the fake of `sandboxer dev`,
    #: plain HTTP on loopback (`SANDBOXER_E2B_TRAFFIC_SCHEME=http`).
    traffic_scheme: Literal["https", "http"] = "https"


def _all_public(ports: tuple[Port, ...]) -> bool:
    """E2B makes all of a sandbox's ports public or none: public if the profile
    declares ports and every one is public; private otherwise."""
    return bool(ports) and all(p.public for p in ports)


def _parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _build_path(ref: TemplateBuildRef) -> str:
    """`/templates/{id}/builds/{buildID}`, each part one path segment."""
    return f"/templates/{quote(ref.template_id, safe='')}/builds/{quote(ref.build_id, safe='')}"


def _retry_after_s(response: httpx.Response) -> float | None:
    """`Retry-After` in seconds (a number or an HTTP date), if the response has one."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _should_retry(response: httpx.Response) -> bool:
    """E2B's own verdict (`Should-Retry`), else the SDK's rule for the status."""
    header = response.headers.get("Should-Retry")
    if header is not None:
        return bool(header.strip().lower() == "true")
    return response.status_code in RETRYABLE_STATUSES


class E2BAdapter(SandboxAdapter):
    """E2B sandboxes over httpx."""

    extension_id: ClassVar[str] = "ext.e2b"
    Rates: ClassVar[type[BaseModel]] = E2BRates
    Config: ClassVar[type[BaseModel]] = E2BConfig
    MeterFields: ClassVar[type[BaseModel]] = E2BMeterFields
    env_prefix: ClassVar[str | None] = "SANDBOXER_E2B_"
    serves_ports: ClassVar[bool] = True
    can_extend: ClassVar[bool] = True
    builds_templates: ClassVar[bool] = True

    def __init__(self, context: AdapterContext) -> None:
        self.rates = context.rates(E2BRates)
        self.config = context.config(E2BConfig, self.env_prefix)
        self._deployment = context.deployment
        self._client: httpx.AsyncClient | None = None
        #: Log entries of each build already handed out by `template_progress`.
        self._logs_seen: dict[TemplateBuildRef, int] = {}

    def _http(self) -> httpx.AsyncClient:
        """The shared client, made on first use (pooled connections for every call)."""
        if self._client is None:
            import httpx

            self._client = httpx.AsyncClient(
                base_url=self.config.api_url,
                timeout=self.config.request_timeout_s,
                limits=httpx.Limits(
                    max_connections=self.config.max_connections,
                    max_keepalive_connections=self.config.max_connections,
                ),
                headers={"User-Agent": "sandboxer"},
                event_hooks={"request": [observe.inject_http]},
            )
        return self._client

    # -- the seam ---------------------------------------------------------------------

    async def provision(self, spec: SandboxSpec, credentials: Credentials) -> ProviderSandbox:
        ports = tuple(spec.profile.ports)
        refused = [p.port for p in ports if p.protocol == "tcp"]
        if refused:  # before anything is made: another route may serve raw TCP
            raise ProviderRejected(f"ext.e2b: E2B serves no raw TCP ports ({refused})")
        body: dict[str, Any] = {
            "templateID": spec.template or self.config.template,
            "timeout": self.config.timeout_s(spec.ttl_s),
            "metadata": {**spec.metadata, **spec.tags},  # our tags win
            # One switch for all of a sandbox's ports: public only if every one is.
            "network": {"allowPublicTraffic": _all_public(ports)},
        }
        if self.config.env_vars:
            body["envVars"] = self.config.env_vars
        response = await self._call(
            "POST",
            "/v2/sandboxes",
            credentials,
            json=body,
            creating=True,
            headers={"Idempotency-Key": self.idempotency_key(spec.sandbox_id)},
        )
        return ProviderSandbox(
            provider_sandbox_id=str(response.json()["sandboxID"]),
            tags=spec.tags,
            running=True,
            started_at=utcnow(),
            ports=ports,
        )

    async def wait_ready(
        self, sandbox: ProviderSandbox, credentials: Credentials
    ) -> ProviderSandbox:
        # A 201 means E2B already started it; the detail confirms it is running and says
        # what it is billed on (vCPUs, memory) and since when, and its domain.
        path = f"/sandboxes/{sandbox.provider_sandbox_id}"
        response = await self._call("GET", path, credentials, accept=(404,))
        if response.status_code == 404:
            raise ProviderFailed(f"ext.e2b: sandbox {sandbox.provider_sandbox_id} is gone")
        detail = response.json()
        found = self._sandbox(detail)
        if not found.running:
            raise ProviderFailed(f"ext.e2b: sandbox {sandbox.provider_sandbox_id} is paused")
        domain = str(detail.get("domain") or self.config.domain)
        return dataclasses.replace(
            found,
            ports=sandbox.ports,
            endpoints=tuple(
                self._endpoint(found.provider_sandbox_id, domain, p, sandbox.ports)
                for p in sandbox.ports
            ),
            control=ControlEndpoint(
                kind="e2b-envd",
                url=self._url("https", found.provider_sandbox_id, domain, ENVD_PORT),
                auth="header",
                auth_name=ENVD_HEADER,
                sdk={"domain": domain, "envd_version": str(detail.get("envdVersion") or "")},
            ),
        )

    async def teardown(self, provider_sandbox_id: str, credentials: Credentials) -> None:
        # 404: already killed, or stopped at its timeout. Gone either way.
        path = f"/sandboxes/{provider_sandbox_id}"
        await self._call("DELETE", path, credentials, accept=(404,))

    async def connect(self, reach: Reach, credentials: Credentials) -> Grant:
        # `connect` with no timeout hands back a running sandbox's tokens and changes
        # nothing else; the tokens are never kept.
        path = f"/v2/sandboxes/{reach.provider_sandbox_id}/connect"
        answer = (await self._call("POST", path, credentials, json={})).json()
        traffic, envd = answer.get("trafficAccessToken"), answer.get("envdAccessToken")
        wanted = [e for e in reach.endpoints if reach.port in (None, e.port)]
        granted = []
        for endpoint in wanted:
            private = not endpoint.public and traffic
            granted.append(
                Credential(
                    port=endpoint.port,
                    url=endpoint.url,
                    auth="header" if private else "none",
                    auth_name=TRAFFIC_HEADER if private else None,
                    secret=traffic if private else None,
                    expires_at=reach.expires_at,
                )
            )
        control = None
        if reach.port is None and reach.control is not None and envd:
            control = Credential(
                port=None,
                url=reach.control.url,
                auth="header",
                auth_name=ENVD_HEADER,
                secret=envd,
                expires_at=reach.expires_at,
            )
        sdk = {
            "sandbox_id": reach.provider_sandbox_id,
            "domain": str(answer.get("domain") or self.config.domain),
            "envd_version": str(answer.get("envdVersion") or ""),
        }
        return Grant(granted, control, sdk if control else {})

    async def extend(
        self, provider_sandbox_id: str, expires_at: datetime, credentials: Credentials
    ) -> None:
        # E2B's timeout counts from now; an absolute expiry makes a repeat harmless.
        timeout = max(1, math.ceil((expires_at - utcnow()).total_seconds()))
        path = f"/sandboxes/{provider_sandbox_id}/timeout"
        await self._call("POST", path, credentials, json={"timeout": timeout})

    def estimate_cost(self, profile: Profile, ttl_s: int) -> Decimal:
        seconds = Decimal(self.config.timeout_s(ttl_s))
        return self.rates.cost(profile.resources.cpu, profile.resources.memory_mb, seconds)

    def meter_actual(self, sandbox: ProviderSandbox, stopped_at: datetime) -> Usage:
        fields = E2BMeterFields.model_validate(sandbox.meter_fields)
        # E2B kills a sandbox at its timeout, so nothing is billed beyond the plan's cap.
        return metered_usage(
            sandbox,
            stopped_at,
            self.rates.per_second(fields.cpu_count, fields.memory_mb),
            fields=fields.model_dump(),
            max_s=self.config.max_timeout_s,
        )

    async def find(
        self, tags: Mapping[str, str], credentials: Credentials
    ) -> list[ProviderSandbox]:
        # The metadata filter is encoded as the SDK does: quoted pairs, url-encoded again.
        query = urlencode({quote(k): quote(v) for k, v in tags.items()})
        params = {"metadata": query, "state": "running,paused", "limit": "100"}
        found: list[ProviderSandbox] = []
        seen_tokens: set[str] = set()
        while True:
            response = await self._call("GET", "/v2/sandboxes", credentials, params=params)
            for item in response.json():
                sandbox = self._sandbox(item)
                # Never trust a filter with another deployment's sandboxes.
                if tags.items() <= sandbox.tags.items():
                    found.append(sandbox)
            token = response.headers.get("X-Next-Token")
            if not token or token in seen_tokens:
                return found
            seen_tokens.add(token)
            params = {**params, "nextToken": token}

    async def register_template(
        self, image: TemplateImage, credentials: Credentials
    ) -> TemplateBuildRef:
        # E2B claims the alias when a build is requested, so a registration that got
        # that far (before a crash, or on another worker) is found, and its build kept:
        # requesting another would supersede it, starting one cancel it.
        existing = await self._template_id(image.alias, credentials)
        latest = await self._latest_build(existing, credentials) if existing else None
        if latest is not None:
            ref, status = latest
            if status == "waiting":  # requested, never started: the crash came between
                await self._start_build(ref, image, credentials)
            if status != "error":
                return ref
        # No build yet, or the last one failed: registering again is trying again.
        body = {"name": image.alias, "cpuCount": image.cpu, "memoryMB": image.memory_mb}
        requested = await self._call("POST", "/v3/templates", credentials, json=body, creating=True)
        answer = requested.json()
        ref = TemplateBuildRef(str(answer["templateID"]), str(answer["buildID"]))
        await self._start_build(ref, image, credentials)
        return ref

    async def template_progress(
        self, ref: TemplateBuildRef, credentials: Credentials
    ) -> TemplateProgress:
        # E2B pages the log (`logsOffset`); this process remembers how far it has read,
        # so after a restart the first poll hands out the whole log again.
        offset = self._logs_seen.get(ref, 0)
        info = await self._build_status(ref, offset, credentials)
        state = BUILD_STATES.get(str(info.get("status")), "building")
        entries = page = list(info.get("logEntries") or [])
        while state != "building" and len(page) == MAX_LOG_ENTRIES:
            # Finished, so no poll follows: the rest of the log comes now.
            more = await self._build_status(ref, offset + len(entries), credentials)
            page = list(more.get("logEntries") or [])
            entries = entries + page
        self._logs_seen[ref] = offset + len(entries)
        reason = None
        if state == "failed":
            given = (info.get("reason") or {}).get("message")
            reason = redact(str(given or "the build failed, E2B gave no reason"), credentials)
        logs = tuple(redact(self._log_line(e), credentials) for e in entries)
        return TemplateProgress(state, reason, logs)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- helpers ----------------------------------------------------------------------

    def idempotency_key(self, sandbox_id: str) -> str:
        """The create's `Idempotency-Key`: one per sandbox and deployment, so that two
        deployments sharing a key never collide."""
        return f"sandboxer-{self._deployment}-{sandbox_id}"

    def _url(self, scheme: str, provider_sandbox_id: str, domain: str, port: int) -> str:
        """`https://<port>-<id>.<domain>`: where E2B's edge serves a sandbox's port."""
        scheme = "http" if self.config.traffic_scheme == "http" else scheme
        return f"{scheme}://{port}-{provider_sandbox_id}.{domain}"

    def _endpoint(
        self, provider_sandbox_id: str, domain: str, port: Port, ports: tuple[Port, ...]
    ) -> Endpoint:
        public = _all_public(ports)
        scheme = "wss" if port.protocol == "wss" else "https"
        if self.config.traffic_scheme == "http":
            scheme = "ws" if port.protocol == "wss" else "http"
        return Endpoint(
            port=port.port,
            protocol=port.protocol,
            public=public,
            url=f"{scheme}://{port.port}-{provider_sandbox_id}.{domain}",
            host=f"{port.port}-{provider_sandbox_id}.{domain}",
            auth="none" if public else "header",
            auth_name=None if public else TRAFFIC_HEADER,
        )

    @staticmethod
    def _sandbox(item: Mapping[str, Any]) -> ProviderSandbox:
        """A ProviderSandbox from E2B's `SandboxDetail` or `ListedSandbox`."""
        metadata = item.get("metadata")
        return ProviderSandbox(
            provider_sandbox_id=str(item["sandboxID"]),
            tags=dict(metadata) if isinstance(metadata, dict) else {},
            running=item.get("state") == "running",
            started_at=_parse_time(item["startedAt"]),
            meter_fields={"cpu_count": int(item["cpuCount"]), "memory_mb": int(item["memoryMB"])},
        )

    async def _template_id(self, alias: str, credentials: Credentials) -> str | None:
        """The id of this team's template `alias`, or None if there is none."""
        path = f"/templates/aliases/{quote(alias, safe='')}"
        response = await self._call("GET", path, credentials, accept=(403, 404))
        if response.status_code == 403:  # E2B's "exists, but you are not the owner"
            raise ProviderRejected(f"ext.e2b: template alias {alias!r} is another team's")
        if response.status_code == 404:
            return None
        return str(response.json()["templateID"])

    async def _latest_build(
        self, template_id: str, credentials: Credentials
    ) -> tuple[TemplateBuildRef, str] | None:
        """The template's newest build and its E2B status, if it has any."""
        path = f"/templates/{quote(template_id, safe='')}"
        builds = (await self._call("GET", path, credentials)).json().get("builds") or []
        if not builds:
            return None
        newest = max(builds, key=lambda b: _parse_time(str(b["createdAt"])))
        return TemplateBuildRef(template_id, str(newest["buildID"])), str(newest["status"])

    async def _start_build(
        self, ref: TemplateBuildRef, image: TemplateImage, credentials: Credentials
    ) -> None:
        """Start the requested build `ref` from `image`. A 400 is E2B refusing to start
        a build twice (a retried start, another worker's) unless it is still waiting."""
        body: dict[str, Any] = {"fromImage": image.image, "steps": [], "force": False}
        if image.start_cmd:
            body["startCmd"] = image.start_cmd
        if image.ready_cmd:
            body["readyCmd"] = image.ready_cmd
        path = f"/v2{_build_path(ref)}"
        response = await self._call("POST", path, credentials, json=body, accept=(400,))
        if response.status_code == 400:
            status = (await self._build_status(ref, 0, credentials)).get("status")
            if status == "waiting":
                raise ProviderRejected(self._error_text(response, f"POST {path}", credentials)[0])

    async def _build_status(
        self, ref: TemplateBuildRef, logs_offset: int, credentials: Credentials
    ) -> dict[str, Any]:
        """E2B's `TemplateBuildInfo` of `ref`, with its log entries from `logs_offset`."""
        path = f"{_build_path(ref)}/status"
        params = {"logsOffset": str(logs_offset), "limit": str(MAX_LOG_ENTRIES)}
        answer = (await self._call("GET", path, credentials, params=params)).json()
        return answer if isinstance(answer, dict) else {}

    @staticmethod
    def _log_line(entry: Mapping[str, Any]) -> str:
        """`<timestamp> <level> [<step>] <message>`: one of E2B's build log entries."""
        step = f" [{entry['step']}]" if entry.get("step") else ""
        head = f"{entry.get('timestamp', '')} {entry.get('level', 'info')}{step}"
        return f"{head} {entry.get('message', '')}"

    async def _call(
        self,
        method: str,
        path: str,
        credentials: Credentials,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        creating: bool = False,
        accept: Collection[int] = (),
    ) -> httpx.Response:
        """One API call, retried as E2B asks; raises a SandboxerError that never contains
        the key. A status in `accept` (404: already gone) is returned, not failed on."""
        import httpx

        key = self._key(credentials)
        what = f"{method} {path}"
        request_headers = {"X-API-KEY": key, **(headers or {})}
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                response = await self._http().request(
                    method, path, json=json, params=params, headers=request_headers
                )
            except httpx.TransportError as exc:
                # The request may have been acted on; repeating it is safe (see above).
                error: SandboxerError = ProviderUnavailable(
                    redact(f"ext.e2b: {what}: {type(exc).__name__}: {exc}", credentials)
                )
                delay = self._backoff_s(attempt)
            else:
                if response.status_code < 300 or response.status_code in accept:
                    return response
                if not _should_retry(response):
                    raise self._failure(response, what, credentials, creating=creating)
                error = ProviderUnavailable(self._error_text(response, what, credentials)[0])
                retry_after = _retry_after_s(response)
                delay = self._backoff_s(attempt) if retry_after is None else retry_after
                if delay > self.config.max_retry_after_s:
                    raise error  # JetStream redelivers later; a handler does not sleep that long
            if attempt == self.config.max_attempts:
                raise error
            log.info("%s: retry %d in %.2fs: %s", what, attempt, delay, error)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _backoff_s(self, attempt: int) -> float:
        return backoff_s(attempt, base_s=self.config.backoff_s, cap_s=self.config.backoff_cap_s)

    @staticmethod
    def _key(credentials: Credentials) -> str:
        key = credentials.values.get("api_key")
        if not key:
            raise ProviderRejected("ext.e2b: no api_key in the resolved credentials")
        return key

    @staticmethod
    def _error_text(
        response: httpx.Response, what: str, credentials: Credentials
    ) -> tuple[str, str | None]:
        """`ext.e2b: POST /v2/sandboxes: 429 <E2B's message> (error_code=...)`, with the
        key blanked out should E2B ever echo it, and E2B's `error_code` if any."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        message = str(body.get("message") or response.reason_phrase)[:300]
        code = body.get("error_code")
        suffix = f" (error_code={code})" if code else ""
        text = f"ext.e2b: {what}: {response.status_code} {message}{suffix}"
        return redact(text, credentials), str(code) if code else None

    def _failure(
        self, response: httpx.Response, what: str, credentials: Credentials, *, creating: bool
    ) -> SandboxerError:
        """The error for an answer that must not be retried here."""
        status = response.status_code
        message, error_code = self._error_text(response, what, credentials)
        if error_code in TRANSIENT_ERROR_CODES:
            return ProviderUnavailable(message)
        if status in (401, 403):
            return ProviderRejected(f"{message}; the API key was refused")
        if creating and 400 <= status < 500 and error_code not in AMBIGUOUS_ERROR_CODES:
            # E2B refused the create: nothing was made, another provider may be tried.
            return ProviderRejected(message)
        if status >= 500 and response.headers.get("Should-Retry") is None:
            # An internal error with no advice: a later delivery may succeed, and the
            # idempotency key makes a repeated create safe.
            return ProviderUnavailable(message)
        return ProviderFailed(message)
