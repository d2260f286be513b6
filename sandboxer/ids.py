"""Deterministic ids: the same request always maps to the same sandbox and events."""

from __future__ import annotations

import hashlib


def sandbox_id_for(tenant: str, request_id: str) -> str:
    """The sandbox id of (`tenant`, `request_id`), the idempotency key of a provision."""
    digest = hashlib.sha256(f"{tenant}\x00{request_id}".encode()).hexdigest()
    return f"sbx-{digest[:24]}"


def ttl_destroy_request_id(sandbox_id: str) -> str:
    """The request id of the destroy scheduled for a sandbox's expiry."""
    return f"ttl-{sandbox_id}"
