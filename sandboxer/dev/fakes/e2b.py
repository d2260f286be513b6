"""A fake E2B control plane: a real HTTP server on 127.0.0.1 speaking the REST API that
the official `e2b` SDK and `ext.e2b` use (see docs/research/e2b-sdk.md).

Realistic where it matters: ids of 20 `[a-z0-9]`, metadata filtering and pagination,
idempotency keys, sandboxes that die at their timeout, API keys checked, JSON errors.
Faults can be scripted: statuses (429, 5xx, with Retry-After / Should-Retry), latency,
and responses dropped after the server acted (the ambiguous failure).

Templates are built as E2B builds them from an OCI image (`AsyncTemplate.build` of the
SDK, `register_template` of ext.e2b): `POST /v3/templates` claims the name and opens a
`waiting` build, `POST /v2/templates/{id}/builds/{buildID}` starts it, and its status
(`GET /templates/{id}/builds/{buildID}/status`, log entries from `logsOffset`) turns
`ready` on the `build_polls`-th poll, or `error` with E2B's `reason` for an image in
`failing_images`; a ready template's id and name can then create sandboxes.
`GET /templates/aliases/{alias}` and `GET /templates/{id}` answer as E2B's do.

Sandboxes are reachable too: a second loopback server plays E2B's edge, routing by
host (`<port>-<sandbox id>.localhost:<its port>`, the sandboxes' `domain`) or, as
`sandbox.e2b.app` does, by the `E2b-Sandbox-Id` and `E2b-Sandbox-Port` headers. A
private sandbox's ports answer 403 without its `e2b-traffic-access-token`; envd's port
(49983) answers `/health` only with its `X-Access-Token`; any other port answers who
served it.
"""

from __future__ import annotations

import json
import random
import re
import secrets
import string
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from sandboxer.dev.fakes.http import LoopbackHTTP, sandbox_page, send_json

#: envd's port, and the headers of E2B's edge.
ENVD_PORT = 49983
TRAFFIC_HEADER = "e2b-traffic-access-token"
#: E2B's rules for a template's name (`[namespace/]alias[:tag]`) and its defaults.
NAME_PATTERN = re.compile(r"^[a-z0-9-_]+$")
TAG_PATTERN = re.compile(r"^[a-z0-9-_.]+$")
DEFAULT_TAG = "default"
DEFAULT_TEMPLATE_RESOURCES = (2, 1024)
#: The most log entries one status answer carries.
MAX_LOG_ENTRIES = 100
SUPERSEDED = "The build was canceled because it was superseded by a newer one."


@dataclass
class Fault:
    """What to do to the next matching request instead of (or after) serving it."""

    status: int | None = None  # answer this status without acting
    retry_after: str | None = None
    should_retry: str | None = None
    delay_s: float = 0.0
    drop_after_acting: bool = False  # act, then close the connection unanswered
    method: str = "POST"
    path: str | None = None  # only requests whose path starts with this
    error_code: str | None = None  # E2B's `error_code` in the error body

    def matches(self, method: str, path: str) -> bool:
        return self.method == method and (self.path is None or path.startswith(self.path))


@dataclass
class FakeSandbox:
    sandbox_id: str
    template_id: str
    metadata: dict[str, str]
    env_vars: dict[str, str]
    started_at: datetime
    end_at: datetime
    cpu_count: int = 2
    memory_mb: int = 512
    killed_at: datetime | None = None
    public: bool = True  # E2B's default when `network.allowPublicTraffic` is omitted
    domain: str | None = None
    traffic_token: str = field(default_factory=lambda: "tat_" + secrets.token_hex(16))
    envd_token: str = field(default_factory=lambda: "eat_" + secrets.token_hex(16))

    def alive(self, now: datetime) -> bool:
        return self.killed_at is None and now < self.end_at

    def summary(self) -> dict[str, Any]:
        """E2B's `Sandbox`: the answer to a create or a connect, tokens included."""
        return {
            "templateID": self.template_id,
            "sandboxID": self.sandbox_id,
            "clientID": "fake-client",
            "envdVersion": "0.4.0",
            "envdAccessToken": self.envd_token,
            "trafficAccessToken": None if self.public else self.traffic_token,
            "domain": self.domain,
        }

    def detail(self) -> dict[str, Any]:
        """E2B's `SandboxDetail`: no traffic token."""
        summary = {k: v for k, v in self.summary().items() if k != "trafficAccessToken"}
        return {
            **summary,
            "startedAt": _iso(self.started_at),
            "endAt": _iso(self.end_at),
            "cpuCount": self.cpu_count,
            "memoryMB": self.memory_mb,
            "diskSizeMB": 1024,
            "state": "running",
            "metadata": self.metadata,
        }


@dataclass
class FakeBuild:
    """One build of a template: `waiting` until started, then `building` until the
    status poll that finds it `ready` or, with a `reason`, `error`."""

    build_id: str
    template_id: str
    cpu_count: int
    memory_mb: int
    tags: list[str]
    created_at: datetime
    status: str = "waiting"
    from_image: str | None = None
    from_template: str | None = None
    start_cmd: str | None = None
    ready_cmd: str | None = None
    polls: int = 0  # status polls since it started
    log_entries: list[dict[str, Any]] = field(default_factory=list)
    reason: dict[str, Any] | None = None
    finished_at: datetime | None = None

    def log(self, message: str, level: str = "info", step: str | None = None) -> None:
        entry = {"timestamp": _iso(datetime.now(UTC)), "message": message, "level": level}
        self.log_entries.append({**entry, **({"step": step} if step else {})})

    def fail(self, message: str, step: str | None = None) -> None:
        self.status, self.finished_at = "error", datetime.now(UTC)
        self.reason = {"message": message, **({"step": step} if step else {})}

    def summary(self) -> dict[str, Any]:
        """E2B's `TemplateBuild`, as `GET /templates/{id}` lists it."""
        return {
            "buildID": self.build_id,
            "status": self.status,
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.finished_at or self.created_at),
            **({"finishedAt": _iso(self.finished_at)} if self.finished_at else {}),
            "cpuCount": self.cpu_count,
            "memoryMB": self.memory_mb,
            "diskSizeMB": 1024,
            "envdVersion": "0.4.0",
        }


@dataclass
class FakeTemplate:
    """A template of the team's, made by `POST /v3/templates`: its alias is claimed
    from the first request, before any build is ready."""

    template_id: str
    alias: str
    team: str
    created_at: datetime
    builds: list[FakeBuild] = field(default_factory=list)  # oldest first

    @property
    def names(self) -> list[str]:
        return [f"{self.team}/{self.alias}"]

    def detail(self) -> dict[str, Any]:
        """E2B's `TemplateWithBuilds`: its builds newest first."""
        ready = [b for b in self.builds if b.status == "ready"]
        latest = self.builds[-1] if self.builds else None
        shown = ready[-1] if ready else latest
        return {
            "templateID": self.template_id,
            "buildID": ready[-1].build_id if ready else "",
            "cpuCount": shown.cpu_count if shown else 0,
            "memoryMB": shown.memory_mb if shown else 0,
            "diskSizeMB": 1024,
            "public": False,
            "aliases": [self.alias],
            "names": self.names,
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(latest.created_at if latest else self.created_at),
            "createdBy": None,
            "lastSpawnedAt": None,
            "spawnCount": 0,
            "buildCount": len(self.builds),
            "envdVersion": "0.4.0",
            "buildStatus": latest.status if latest else "waiting",
            "builds": [b.summary() for b in reversed(self.builds)],
        }


#: Path segments followed by an id, and the placeholder `requests` counts it under.
_ID_AFTER = {
    "sandboxes": "{id}",
    "templates": "{id}",
    "builds": "{buildID}",
    "aliases": "{alias}",
}


def _route(method: str, path: str) -> str:
    """`GET /sandboxes/{id}`, `POST /v2/templates/{id}/builds/{buildID}`: a request on
    any sandbox, template or build, as `requests` counts it."""
    segments = path.strip("/").split("/")
    route = [
        _ID_AFTER[segments[i - 1]]
        if i and segments[i - 1] in _ID_AFTER and segment not in _ID_AFTER
        else segment
        for i, segment in enumerate(segments)
    ]
    return f"{method} /{'/'.join(route)}"


def _error(status: int, message: str) -> tuple[int, Any, dict[str, str]]:
    return status, {"code": status, "message": message}, {}


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class FakeE2B(LoopbackHTTP):
    api_keys: set[str] = field(default_factory=lambda: {"e2b_test_key"})
    sandboxes: dict[str, FakeSandbox] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: Counter[str] = field(
        default_factory=Counter
    )  # by route, e.g. `DELETE /sandboxes/{id}`
    idempotency: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (body, id)
    max_timeout_s: int = 3600
    #: Templates and the (vCPUs, MiB) their sandboxes get; others are unknown (404).
    #: One not in `registered` is another team's (E2B's own `base`): 403 to look up.
    templates: dict[str, tuple[int, int]] = field(default_factory=lambda: {"base": (2, 512)})
    #: The keys' team: its templates are named `<team>/<alias>`.
    team: str = "sandboxer-test"
    #: The team's templates by id; each one's id and names join `templates` once a
    #: build of it is ready.
    registered: dict[str, FakeTemplate] = field(default_factory=dict)
    #: The status poll that finds a started build finished (1: the first).
    build_polls: int = 2
    #: Images whose builds fail, and the reason E2B reports (a failed pull, say).
    failing_images: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_DELETE(self) -> None:
                fake._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        LoopbackHTTP.__init__(self, Handler)
        self.edge = _Edge(self)

    @property
    def url(self) -> str:
        return self.base_url

    @property
    def domain(self) -> str:
        """The sandboxes' domain: E2B's edge on loopback."""
        return f"localhost:{self.edge.port}"

    def __enter__(self) -> FakeE2B:
        self.edge.__enter__()
        return LoopbackHTTP.__enter__(self)

    def __exit__(self, *exc: object) -> None:
        LoopbackHTTP.__exit__(self, *exc)
        self.edge.__exit__(*exc)

    def sandbox(self, sandbox_id: str) -> FakeSandbox | None:
        """A live sandbox by id, or None."""
        with self._lock:
            found = self.sandboxes.get(sandbox_id)
            return found if found is not None and found.alive(datetime.now(UTC)) else None

    def alive(self) -> list[FakeSandbox]:
        now = datetime.now(UTC)
        with self._lock:
            return [s for s in self.sandboxes.values() if s.alive(now)]

    @property
    def builds(self) -> list[FakeBuild]:
        """Every build requested, of every template, oldest first."""
        with self._lock:
            every = [b for t in self.registered.values() for b in t.builds]
        return sorted(every, key=lambda b: b.created_at)

    # -- HTTP -------------------------------------------------------------------------

    def _handle(self, http: BaseHTTPRequestHandler, method: str) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        body = http.rfile.read(length) if length else b""
        parts = urlsplit(http.path)
        with self._lock:
            self.requests[_route(method, parts.path)] += 1
            fault = next((f for f in self.faults if f.matches(method, parts.path)), None)
            if fault is not None:
                self.faults.remove(fault)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.status is not None:
            headers = {
                k: v
                for k, v in (
                    ("Retry-After", fault.retry_after),
                    ("Should-Retry", fault.should_retry),
                )
                if v
            }
            error = {
                "code": fault.status,
                "message": "injected",
                **({"error_code": fault.error_code} if fault.error_code else {}),
            }
            return self._send(http, fault.status, error, headers)
        if http.headers.get("X-API-KEY") not in self.api_keys:
            return self._send(http, 401, {"code": 401, "message": "Invalid API key"})
        status, payload, headers = self._act(method, parts.path, parts.query, body, http.headers)
        if fault is not None and fault.drop_after_acting:
            http.close_connection = True
            return None  # acted, but the answer is lost
        return self._send(http, status, payload, headers)

    _send = staticmethod(send_json)

    def _act(
        self, method: str, path: str, query: str, body: bytes, headers: Any
    ) -> tuple[int, Any, dict[str, str]]:
        now = datetime.now(UTC)
        segments = path.strip("/").split("/")
        with self._lock:
            answer = self._template_api(method, [unquote(s) for s in segments], query, body, now)
            if answer is not None:
                return answer
            if method == "POST" and path == "/v2/sandboxes":
                return self._create(json.loads(body or b"{}"), headers.get("Idempotency-Key"), now)
            if method == "GET" and path == "/v2/sandboxes":
                return self._list(query, now)
            if segments[:2] == ["v2", "sandboxes"] and segments[3:] == ["connect"]:
                sandbox = self.sandboxes.get(segments[2])
                if sandbox is None or not sandbox.alive(now):
                    return 404, {"code": 404, "message": f"sandbox {segments[2]} not found"}, {}
                return 200, sandbox.summary(), {}
            if len(segments) >= 2 and segments[0] == "sandboxes":
                sandbox = self.sandboxes.get(segments[1])
                if sandbox is None or not sandbox.alive(now):
                    return 404, {"code": 404, "message": f"sandbox {segments[1]} not found"}, {}
                if method == "GET" and len(segments) == 2:
                    return 200, sandbox.detail(), {}
                if method == "DELETE" and len(segments) == 2:
                    sandbox.killed_at = now
                    return 204, None, {}
                if method == "POST" and segments[2:] == ["timeout"]:
                    timeout = int(json.loads(body)["timeout"])
                    sandbox.end_at = now + timedelta(seconds=min(timeout, self.max_timeout_s))
                    return 204, None, {}
        return 404, {"code": 404, "message": f"no route {method} {path}"}, {}

    def _create(
        self, request: dict[str, Any], key: str | None, now: datetime
    ) -> tuple[int, Any, dict[str, str]]:
        canonical = json.dumps(request, sort_keys=True)
        if key is not None and key in self.idempotency:
            seen_body, sandbox_id = self.idempotency[key]
            if seen_body != canonical:
                return (
                    409,
                    {
                        "code": 409,
                        "message": "idempotency key reused with another body",
                        "error_code": "idempotency_request_mismatch",
                    },
                    {},
                )
            return 201, self.sandboxes[sandbox_id].summary(), {}
        if "templateID" not in request:
            return 400, {"code": 400, "message": "templateID is required"}, {}
        if request["templateID"] not in self.templates:
            return (
                404,
                {"code": 404, "message": f"template '{request['templateID']}' not found"},
                {},
            )
        cpu_count, memory_mb = self.templates[request["templateID"]]
        timeout = min(int(request.get("timeout", 300)), self.max_timeout_s)
        sandbox_id = _new_id()
        named = self._named(request["templateID"])  # E2B answers with the id of a name
        sandbox = FakeSandbox(
            sandbox_id=sandbox_id,
            template_id=named.template_id if named else request["templateID"],
            metadata=dict(request.get("metadata") or {}),
            env_vars=dict(request.get("envVars") or {}),
            started_at=now,
            end_at=now + timedelta(seconds=timeout),
            cpu_count=cpu_count,
            memory_mb=memory_mb,
            public=bool((request.get("network") or {}).get("allowPublicTraffic", True)),
            domain=self.domain,
        )
        self.sandboxes[sandbox_id] = sandbox
        if key is not None:
            self.idempotency[key] = (canonical, sandbox_id)
        return 201, sandbox.summary(), {}

    def _list(self, query: str, now: datetime) -> tuple[int, Any, dict[str, str]]:
        params = parse_qs(query)
        wanted = {unquote(k): unquote(v) for k, v in parse_qsl(params.get("metadata", [""])[0])}
        states = set(",".join(params.get("state", ["running,paused"])).split(","))
        limit = int(params.get("limit", ["100"])[0])
        offset = int(params.get("nextToken", ["0"])[0] or 0)
        matching = [
            s
            for s in sorted(self.sandboxes.values(), key=lambda s: s.started_at)
            if s.alive(now) and "running" in states and wanted.items() <= s.metadata.items()
        ]
        page = matching[offset : offset + limit]
        more = offset + limit < len(matching)
        headers = {"X-Next-Token": str(offset + limit)} if more else {}
        items = [
            {k: v for k, v in s.detail().items() if k not in ("domain", "envdAccessToken")}
            for s in page
        ]
        return 200, items, headers

    # -- templates --------------------------------------------------------------------

    def _template_api(
        self, method: str, segments: list[str], query: str, body: bytes, now: datetime
    ) -> tuple[int, Any, dict[str, str]] | None:
        """The template endpoints the SDK's `AsyncTemplate` calls; None for any other."""
        match method, segments:
            case "POST", ["v3", "templates"]:
                return self._request_build(json.loads(body or b"{}"), now)
            case "POST", ["v2", "templates", template_id, "builds", build_id]:
                return self._start_build(template_id, build_id, json.loads(body or b"{}"))
            case "GET", ["templates", "aliases", alias]:
                return self._alias(alias)
            case "GET", ["templates", template_id, "builds", build_id, "status"]:
                return self._build_status(template_id, build_id, parse_qs(query))
            case "GET", ["templates", template_id]:
                return self._template(template_id)
        return None

    def _named(self, name: str) -> FakeTemplate | None:
        """The team's template called `name` (`alias` or `<team>/alias`), if any."""
        namespace, _, alias = name.rpartition("/")
        if namespace not in ("", self.team):
            return None
        return next((t for t in self.registered.values() if t.alias == alias), None)

    def _request_build(
        self, request: dict[str, Any], now: datetime
    ) -> tuple[int, Any, dict[str, str]]:
        """`POST /v3/templates`: the template of that name (made now if new) gets a new
        `waiting` build, which supersedes its unstarted ones of the same tags."""
        raw = request.get("name") or request.get("alias")
        if not raw:
            return _error(400, "Name is required")
        try:
            namespace, alias, tag = _parse_name(str(raw))
            more = [_checked(t, "tag", TAG_PATTERN) for t in request.get("tags") or []]
        except ValueError as exc:
            return _error(400, f"Invalid name: {exc}")
        if namespace not in (None, self.team):
            return _error(400, f"namespace '{namespace}' does not match the team's")
        tags = sorted({*([tag] if tag else []), *more}) or [DEFAULT_TAG]
        cpu_count, memory_mb = DEFAULT_TEMPLATE_RESOURCES
        cpu_count = int(request.get("cpuCount") or cpu_count)
        memory_mb = int(request.get("memoryMB") or memory_mb)
        if not (1 <= cpu_count <= 32) or (cpu_count != 1 and cpu_count % 2):
            return _error(400, "CPU count must be 1 or an even number, at most 32")
        if memory_mb < 128 or memory_mb % 2:
            return _error(400, "Memory must be at least 128 MiB and divisible by 2")
        template = self._named(alias)
        if template is None:
            if alias in self.templates:  # another team's, E2B's `base` say
                return _error(409, f"Alias '{alias}' is already used")
            template = FakeTemplate(_new_id(), alias, self.team, now)
            self.registered[template.template_id] = template
        for unstarted in template.builds:
            if unstarted.status == "waiting" and set(unstarted.tags) & set(tags):
                unstarted.fail(SUPERSEDED)
        build = FakeBuild(str(uuid.uuid4()), template.template_id, cpu_count, memory_mb, tags, now)
        template.builds.append(build)
        return (
            202,
            {
                "templateID": template.template_id,
                "buildID": build.build_id,
                "public": False,
                "names": template.names,
                "tags": tags,
                "aliases": [template.alias],
            },
            {},
        )

    def _build_of(self, template_id: str, build_id: str) -> FakeBuild | None:
        template = self.registered.get(template_id)
        builds = template.builds if template else []
        return next((b for b in builds if b.build_id == build_id), None)

    def _start_build(
        self, template_id: str, build_id: str, request: dict[str, Any]
    ) -> tuple[int, Any, dict[str, str]]:
        """`POST /v2/templates/{id}/builds/{buildID}`: start a `waiting` build from an
        image or a template; a build already started is refused (400), as E2B does."""
        if not _is_uuid(build_id):
            return _error(400, f"Invalid build ID: {build_id}")
        build = self._build_of(template_id, build_id)
        if build is None:
            return _error(404, "Error when getting template: no rows in result set")
        if build.status != "waiting":
            return _error(400, "build is not in waiting state")
        build.from_image = request.get("fromImage")
        build.from_template = request.get("fromTemplate")
        if not (build.from_image or build.from_template):
            return _error(400, "fromImage or fromTemplate is required")
        build.start_cmd, build.ready_cmd = request.get("startCmd"), request.get("readyCmd")
        build.status = "building"
        build.log(f"Building template {template_id}/{build_id}")
        source = f"image {build.from_image}" if build.from_image else build.from_template
        build.log(f"Requesting base {source}", step="base")
        return 202, None, {}

    def _build_status(
        self, template_id: str, build_id: str, params: dict[str, list[str]]
    ) -> tuple[int, Any, dict[str, str]]:
        """`GET .../builds/{buildID}/status`: its state, and its log entries from
        `logsOffset` (at most `limit`, at most 100, at `level` or above)."""
        if not _is_uuid(build_id):
            return _error(400, "Invalid build id")
        build = self._build_of(template_id, build_id)
        if build is None:
            return _error(400, f"Build '{build_id}' not found")
        answer: dict[str, Any] = {
            "logs": [],
            "logEntries": [],
            "templateID": template_id,
            "buildID": build_id,
            "status": build.status,
        }
        if build.status == "waiting":
            return 200, answer, {}
        if build.status == "building":
            self._advance(build)
        offset = int(params.get("logsOffset", ["0"])[0] or 0)
        limit = min(int(params.get("limit", [str(MAX_LOG_ENTRIES)])[0]), MAX_LOG_ENTRIES)
        least = params.get("level", ["debug"])[0]
        entries = [e for e in build.log_entries if _at_least(e["level"], least)]
        answer["logEntries"] = entries[offset : offset + limit]
        answer["status"] = build.status
        if build.reason is not None:
            reason = dict(build.reason)
            if "step" in reason:  # the failed step's warnings and errors, as E2B adds
                reason["logEntries"] = [
                    e
                    for e in answer["logEntries"]
                    if e.get("step") == reason["step"] and _at_least(e["level"], "warn")
                ]
            answer["reason"] = reason
        return 200, answer, {}

    def _advance(self, build: FakeBuild) -> None:
        """One status poll's worth of building: a log line, or the build's end."""
        build.polls += 1
        if build.polls < self.build_polls:
            build.log(f"Building layers ({build.polls}/{self.build_polls})", step="base")
            return
        failure = self.failing_images.get(build.from_image or "")
        if failure is not None:
            build.log(failure, level="error", step="base")
            build.fail(failure, step="base")
            return
        if build.start_cmd:
            build.log(f"Running start command: {build.start_cmd}", step="finalize")
        build.log("Template is ready", step="finalize")
        build.status, build.finished_at = "ready", datetime.now(UTC)
        template = self.registered[build.template_id]
        for name in (template.template_id, template.alias, *template.names):
            self.templates[name] = (build.cpu_count, build.memory_mb)

    def _alias(self, raw: str) -> tuple[int, Any, dict[str, str]]:
        """`GET /templates/aliases/{alias}`: the team's template of that name (200), one
        of another team's (403), or none (404); `alias:tag` also needs the tag."""
        try:
            namespace, alias, tag = _parse_name(raw)
        except ValueError as exc:
            return _error(400, f"Invalid alias format: {exc}")
        if namespace not in (None, self.team):
            return _error(400, f"namespace '{namespace}' does not match the team's")
        template = self._named(alias)
        if template is None:
            if alias in self.templates:
                return _error(403, "You don't have access to this template alias")
            return _error(404, f"template '{alias}' not found")
        wanted = tag or DEFAULT_TAG
        if ":" in raw and not any(wanted in b.tags for b in template.builds):
            return _error(404, f"tag '{wanted}' does not exist for template '{alias}'")
        return 200, {"templateID": template.template_id, "public": False}, {}

    def _template(self, template_id: str) -> tuple[int, Any, dict[str, str]]:
        """`GET /templates/{id}`: the template and its builds, newest first."""
        template = self.registered.get(template_id)
        if template is not None:
            return 200, template.detail(), {}
        if template_id in self.templates:
            message = f"You don't have access to this sandbox template ({template_id})"
            return _error(403, message)
        return _error(404, f"Template {template_id} not found")


def _new_id() -> str:
    """A sandbox's or template's id: 20 of `[a-z0-9]`, as E2B makes them."""
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=20))


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _checked(value: str, what: str, pattern: re.Pattern[str]) -> str:
    cleaned = value.strip().lower()
    if not pattern.match(cleaned):
        raise ValueError(f"invalid {what}: {value}")
    return cleaned


def _parse_name(raw: str) -> tuple[str | None, str, str | None]:
    """E2B's `[namespace/]alias[:tag]`, cleaned (lower case), as (namespace, alias,
    tag); the `default` tag is None, as no tag is."""
    name, has_tag, tag = raw.strip().partition(":")
    namespace, _, alias = name.rpartition("/")
    cleaned_tag = _checked(tag, "tag", TAG_PATTERN) if has_tag else None
    return (
        _checked(namespace, "namespace", NAME_PATTERN) if namespace else None,
        _checked(alias, "template ID", NAME_PATTERN),
        None if cleaned_tag == DEFAULT_TAG else cleaned_tag,
    )


_LEVELS = ("debug", "info", "warn", "error")


def _at_least(level: str, least: str) -> bool:
    rank = {name: i for i, name in enumerate(_LEVELS)}
    return rank.get(level, 0) >= rank.get(least, 0)


class _Edge(LoopbackHTTP):
    """E2B's edge: the sandboxes' ports, on one loopback server."""

    def __init__(self, fake: FakeE2B) -> None:
        edge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                edge._serve(self)

            def do_POST(self) -> None:
                edge._serve(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._fake = fake
        LoopbackHTTP.__init__(self, Handler)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def _serve(self, http: BaseHTTPRequestHandler) -> None:
        length = int(http.headers.get("Content-Length") or 0)
        if length:
            http.rfile.read(length)
        target = _target(http.headers)
        if target is None:
            return send_json(http, 400, {"code": 400, "message": "no sandbox in the host"})
        port, sandbox_id = target
        sandbox = self._fake.sandbox(sandbox_id)
        if sandbox is None:
            return send_json(http, 502, {"code": 502, "message": "The sandbox was not found"})
        path = urlsplit(http.path).path
        if port == ENVD_PORT:
            if http.headers.get("X-Access-Token") != sandbox.envd_token:
                return send_json(http, 401, {"code": 401, "message": "invalid access token"})
            if path == "/health":
                return send_json(http, 204, None)
            return send_json(http, 404, {"code": 404, "message": f"envd: no {path} here"})
        if not sandbox.public and http.headers.get(TRAFFIC_HEADER) != sandbox.traffic_token:
            message = (
                "Sandbox is secured with traffic access token. "
                f"Token header '{TRAFFIC_HEADER}' is missing or invalid"
            )
            return send_json(http, 403, {"code": 403, "message": message})
        return send_json(http, 200, sandbox_page(sandbox_id, port, path))


def _target(headers: Any) -> tuple[int, str] | None:
    """(port, sandbox id) a request is for: from `E2b-Sandbox-Id`/`-Port`, or from a
    host `<port>-<sandbox id>.<domain>`."""
    if headers.get("E2b-Sandbox-Id"):
        try:
            return int(headers.get("E2b-Sandbox-Port") or ENVD_PORT), headers["E2b-Sandbox-Id"]
        except ValueError:
            return None
    label = (headers.get("Host") or "").split(".", 1)[0]
    port, sep, sandbox_id = label.partition("-")
    if not sep or not port.isdigit():
        return None
    return int(port), sandbox_id
