"""What every fake HTTP service of the tests shares: a threaded server on a free
127.0.0.1 port, started and stopped as a context manager; and what a fake sandbox's
own server answers on any of its ports."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


class LoopbackHTTP:
    """Serves `handler` on 127.0.0.1 while the `with` block runs."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()  # clean shutdown: the e2b SDK's runtime dislikes less
        self._server.server_close()


def send_json(
    http: BaseHTTPRequestHandler,
    status: int,
    payload: Any,
    headers: dict[str, str] | None = None,
) -> None:
    """Answer `payload` as JSON (no body for 204)."""
    data = b"" if status == 204 else json.dumps(payload).encode()
    http.send_response(status)
    for name, value in (headers or {}).items():
        http.send_header(name, value)
    if data:
        http.send_header("Content-Type", "application/json")
    http.send_header("Content-Length", str(len(data)))
    http.end_headers()
    http.wfile.write(data)


def sandbox_page(sandbox_id: str, port: int, path: str, **extra: str) -> dict[str, str]:
    """What a fake sandbox's server answers on `port`: who it is, so a test can tell it
    reached the right sandbox."""
    return {"served_by": sandbox_id, "port": str(port), "path": path, **extra}


class OtlpSink(LoopbackHTTP):
    """Takes OTLP/HTTP span exports and counts them (a collector that keeps nothing)."""

    def __init__(self) -> None:
        self.exports = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.exports += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)
