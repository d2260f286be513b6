"""Log lines: `text` (the default) or `json` (`SANDBOXER_LOG_FORMAT=json`: one object a
line, with the `sandbox_id`, `tenant` and `trace_id` of the handler that logged it, where
known). In both, credentials in URLs are blanked (`nats://***@host`, `?token=***`),
whoever wrote the message."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime

from sandboxer import observe

_USERINFO = re.compile(r"(?<=//)[^@/\s]*@")
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:token|access_token|api_key|apikey|key|password|secret|signature)=)[^&\s\"']+"
)


def redact(text: str) -> str:
    """`text` without the credentials URLs in it carry."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub("***@", text))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and what the line is about."""

    def format(self, record: logging.LogRecord) -> str:
        sandbox_id, tenant = observe.about.get()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if sandbox_id:
            line["sandbox_id"] = sandbox_id
        if tenant:
            line["tenant"] = tenant
        if trace_id := observe.trace_id():
            line["trace_id"] = trace_id
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line)


def setup_logging(level: str, log_format: str = "text") -> None:
    """Log to stderr at `level`, as `log_format` says."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if log_format == "json":
        observe.keep_log_context()
    logging.basicConfig(level=level.upper(), handlers=[handler])
