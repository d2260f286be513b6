"""A real HTTP server standing in for fin-hub: it can fail, hang and reject, and it
counts every POST it receives, and what it accepted."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler
from typing import Any

from sandboxer.dev.fakes.http import LoopbackHTTP


@dataclass
class Script:
    """How the next POSTs are answered, in order: `fail` 500s, then `hang` requests that
    never get an answer, then 200s (each after `slow_s`). Keys in `reject` always get a
    422."""

    fail: int = 0
    hang: int = 0
    hang_s: float = 5.0
    slow_s: float = 0.0
    reject: set[str] = field(default_factory=set)
    #: Refusals echo the request's Authorization header (a careless fin-hub).
    echo_auth: bool = False


class FakeFinHub(LoopbackHTTP):
    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.posts = 0
        self.accepted: dict[str, dict[str, Any]] = {}
        self.accepted_count: Counter[str] = Counter()
        self.authorizations: list[str | None] = []
        #: The W3C trace context of each POST (None: it came untraced).
        self.traceparents: list[str | None] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = self.headers.get("Idempotency-Key", "")
                with hub._lock:
                    hub.posts += 1
                    hub.authorizations.append(self.headers.get("Authorization"))
                    hub.traceparents.append(self.headers.get("traceparent"))
                    if key in hub.script.reject:
                        answer = 422
                    elif hub.script.fail > 0:
                        hub.script.fail -= 1
                        answer = 500
                    elif hub.script.hang > 0:
                        hub.script.hang -= 1
                        answer = 0
                    else:
                        answer = 200
                        hub.accepted[key] = json.loads(body)
                        hub.accepted_count[key] += 1
                if answer == 0:
                    time.sleep(hub.script.hang_s)  # the client gives up first
                    self.close_connection = True
                    return
                time.sleep(hub.script.slow_s)
                self.send_response(answer)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                refusal = {"error": "nope"}
                if hub.script.echo_auth:
                    refusal["authorization"] = self.headers.get("Authorization") or ""
                self.wfile.write(b'{"ok": true}' if answer == 200 else json.dumps(refusal).encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)

    @property
    def url(self) -> str:
        return f"{self.base_url}/usage"

    def total_usd(self) -> Decimal:
        with self._lock:
            return sum((Decimal(r["actual_usd"]) for r in self.accepted.values()), Decimal(0))
