"""fin-hub, the finance service: one POST per usage record, with the record id as the
`Idempotency-Key`. This module only speaks HTTP and says what the answer means; the
exporter (`consumers/billing.py`) decides what to do about it."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import httpx

from sandboxer import observe
from sandboxer.errors import SandboxerError
from schemas import UsageRecord


class FinHubUnavailable(SandboxerError):
    """fin-hub did not take the record this time (5xx, 408, 429, timeout, no
    connection); worth trying again later."""

    retryable = True


class FinHubRejected(SandboxerError):
    """fin-hub refused the record for good (a 4xx other than 408/429): retrying the
    same record cannot help; it is kept as a dead letter with fin-hub's answer."""


class Verdict(enum.Enum):
    DELIVERED = "delivered"  # 2xx, or 409: fin-hub has it
    RETRY = "retry"  # 5xx, 408, 429, timeout, connection trouble: try again later
    REJECTED = "rejected"  # any other 4xx: retrying will not help; dead-letter it


#: 4xx answers that are worth another try, and 409, which says fin-hub has the record.
_RETRYABLE_4XX = frozenset({408, 429})
_ALREADY_THERE = 409


@dataclass(frozen=True)
class Outcome:
    """What one POST came to. `detail` is safe to log: it never holds the token."""

    verdict: Verdict
    status: int | None
    detail: str


class FinHubClient:
    """POSTs usage records to `url`, optionally with a bearer token."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url
        self._token = token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            transport=transport,
            event_hooks={"request": [observe.inject_http]},
        )

    async def post(self, record: UsageRecord) -> Outcome:
        """Send one record; never raises for HTTP or network trouble."""
        try:
            with observe.span("finhub POST", record_id=record.record_id):
                response = await self._http.post(
                    self.url,
                    content=record.model_dump_json(),
                    headers={
                        "Content-Type": "application/json",
                        "Idempotency-Key": record.record_id,
                    },
                )
        except httpx.TimeoutException:
            return Outcome(Verdict.RETRY, None, "timed out")
        except httpx.TransportError as exc:
            return Outcome(Verdict.RETRY, None, f"connection failed: {type(exc).__name__}")
        status = response.status_code
        detail = f"HTTP {status}: {response.text[:500]}"
        if self._token:  # should fin-hub ever echo it
            detail = detail.replace(self._token, "***")
        if 200 <= status < 300 or status == _ALREADY_THERE:
            return Outcome(Verdict.DELIVERED, status, detail)
        if status >= 500 or status in _RETRYABLE_4XX:
            return Outcome(Verdict.RETRY, status, detail)
        return Outcome(Verdict.REJECTED, status, detail)

    async def aclose(self) -> None:
        await self._http.aclose()
