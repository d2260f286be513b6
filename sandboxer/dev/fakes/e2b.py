"""A fake E2B control plane: a real HTTP server on 127.0.0.1 speaking the REST API that
the official `e2b` SDK and `ext.e2b` use (see docs/research/e2b-sdk.md).

Realistic where it matters: ids of 20 `[a-z0-9]`, metadata filtering and pagination,
idempotency keys, sandboxes that die at their timeout, API keys checked, JSON errors.
Faults can be scripted: statuses (429, 5xx, with Retry-After / Should-Retry), latency,
and responses dropped after the server acted (the ambiguous failure).
"""

from __future__ import annotations

import json
import random
import string
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

from sandboxer.dev.fakes.http import LoopbackHTTP


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

    def alive(self, now: datetime) -> bool:
        return self.killed_at is None and now < self.end_at

    def summary(self) -> dict[str, Any]:
        return {
            "templateID": self.template_id,
            "sandboxID": self.sandbox_id,
            "clientID": "fake-client",
            "envdVersion": "0.4.0",
            "envdAccessToken": None,
            "domain": None,
        }

    def detail(self) -> dict[str, Any]:
        return {
            **self.summary(),
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

    @property
    def url(self) -> str:
        return self.base_url

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

    @staticmethod
    def _send(
        http: BaseHTTPRequestHandler,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = b"" if status == 204 else json.dumps(payload).encode()
        http.send_response(status)
        for name, value in (headers or {}).items():
            http.send_header(name, value)
        if data:
            http.send_header("Content-Type", "application/json")
        http.send_header("Content-Length", str(len(data)))
        http.end_headers()
        http.wfile.write(data)

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
