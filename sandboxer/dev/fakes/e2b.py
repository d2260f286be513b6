"""A fake E2B control plane: a real HTTP server on 127.0.0.1 speaking the REST API that
the official `e2b` SDK and `ext.e2b` use (see docs/research/e2b-sdk.md).

Realistic where it matters: ids of 20 `[a-z0-9]`, metadata filtering and pagination,
idempotency keys, sandboxes that die at their timeout, API keys checked, JSON errors.
Faults can be scripted: statuses (429, 5xx, with Retry-After / Should-Retry), latency,
and responses dropped after the server acted (the ambiguous failure).

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
import secrets
import string
import threading
import time
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


def _route(method: str, path: str) -> str:
    """`GET /sandboxes/{id}` for a request on any sandbox: what `requests` counts."""
    segments = path.strip("/").split("/")
    if len(segments) >= 2 and segments[0] == "sandboxes":
        segments[1] = "{id}"
    return f"{method} /{'/'.join(segments)}"


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
    templates: dict[str, tuple[int, int]] = field(default_factory=lambda: {"base": (2, 512)})

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
        sandbox_id = "".join(random.choices(string.ascii_lowercase + string.digits, k=20))
        sandbox = FakeSandbox(
            sandbox_id=sandbox_id,
            template_id=request["templateID"],
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
