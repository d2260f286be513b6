"""Configuration from the environment (SPEC "Configuration"), read once at start-up."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_extensions_dir() -> Path:
    """`extensions/` of the source tree, or the copy packed into a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "extensions", here / "_extensions"):
        if candidate.is_dir():
            return candidate
    return here.parent / "extensions"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)


def servers_of(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` as a list of server URLs."""
    return [part.strip() for part in url.split(",") if part.strip()]


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a worker or the CLI needs to know about its surroundings."""

    nats_url: str = "nats://127.0.0.1:4222"
    #: Tag on every provider sandbox; reconciliation never touches another deployment's.
    deployment: str = "default"
    extensions_dir: Path = field(default_factory=default_extensions_dir)
    #: Provision and destroy handlers running at once, per worker process and subject.
    max_in_flight: int = 256
    #: Seconds JetStream waits for an ack; long provider calls send `in_progress` within it.
    ack_wait_s: float = 30.0
    #: Deliveries of one message before it is failed for good.
    max_deliver: int = 5
    #: First retry delay of a transient failure; doubles per delivery up to `retry_cap_s`.
    retry_backoff_s: float = 1.0
    retry_cap_s: float = 60.0
    #: Seconds a stopping worker gives in-flight handlers before it exits anyway.
    drain_timeout_s: float = 60.0
    #: fin-hub's usage endpoint; None disables the export (records stay on the stream).
    fin_hub_url: str | None = None
    #: Seconds one POST to fin-hub may take before it counts as failed (and is retried).
    fin_hub_timeout_s: float = 10.0
    #: JetStream replicas of every stream and bucket (3 on a cluster).
    replicas: int = 1
    #: Seconds between a worker's orphan reconciliation passes (0: never).
    reconcile_every_s: float = 300.0
    #: Seconds a claim or an expiry is given before reconciliation acts on it.
    reconcile_grace_s: float = 120.0

    @property
    def nats_servers(self) -> list[str]:
        """`nats_url` as a list: several servers of a cluster may be given, comma-separated."""
        return servers_of(self.nats_url)

    @staticmethod
    def fin_hub_token() -> str | None:
        """The bearer token for fin-hub, read when needed and never kept in settings
        (which get logged)."""
        return os.environ.get("SANDBOXER_FIN_HUB_TOKEN") or None

    @classmethod
    def from_env(cls) -> Settings:
        """Settings from `SANDBOXER_*` variables, defaults for the rest."""
        return cls(
            nats_url=os.environ.get("SANDBOXER_NATS_URL") or cls.nats_url,
            deployment=os.environ.get("SANDBOXER_DEPLOYMENT") or cls.deployment,
            extensions_dir=Path(
                os.environ.get("SANDBOXER_EXTENSIONS_DIR") or default_extensions_dir()
            ),
            max_in_flight=_env_int("SANDBOXER_MAX_IN_FLIGHT", cls.max_in_flight),
            ack_wait_s=_env_float("SANDBOXER_ACK_WAIT_S", cls.ack_wait_s),
            max_deliver=_env_int("SANDBOXER_MAX_DELIVER", cls.max_deliver),
            retry_backoff_s=_env_float("SANDBOXER_RETRY_BACKOFF_S", cls.retry_backoff_s),
            retry_cap_s=_env_float("SANDBOXER_RETRY_CAP_S", cls.retry_cap_s),
            drain_timeout_s=_env_float("SANDBOXER_DRAIN_TIMEOUT_S", cls.drain_timeout_s),
            fin_hub_url=os.environ.get("SANDBOXER_FIN_HUB_URL") or None,
            fin_hub_timeout_s=_env_float("SANDBOXER_FIN_HUB_TIMEOUT_S", cls.fin_hub_timeout_s),
            replicas=_env_int("SANDBOXER_REPLICAS", cls.replicas),
            reconcile_every_s=_env_float("SANDBOXER_RECONCILE_EVERY_S", cls.reconcile_every_s),
            reconcile_grace_s=_env_float("SANDBOXER_RECONCILE_GRACE_S", cls.reconcile_grace_s),
        )


@dataclass(frozen=True, kw_only=True)
class BaoSettings:
    """How to reach and log in to OpenBao. `token`, or `role_id` + `secret_id`
    (AppRole). Never printed: `repr` leaves the secrets out."""

    addr: str
    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    timeout_s: float = 5.0
    cache_ttl_s: float = 30.0

    def __repr__(self) -> str:
        auth = "token" if self.token else "approle" if self.role_id else "none"
        return f"BaoSettings(addr={self.addr!r}, auth={auth})"

    @classmethod
    def from_env(cls) -> BaoSettings | None:
        """From `BAO_ADDR`/`VAULT_ADDR`, `BAO_TOKEN`/`VAULT_TOKEN` or
        `BAO_ROLE_ID` + `BAO_SECRET_ID`; None when no address is set."""
        addr = os.environ.get("BAO_ADDR") or os.environ.get("VAULT_ADDR")
        if not addr:
            return None
        return cls(
            addr=addr,
            token=os.environ.get("BAO_TOKEN") or os.environ.get("VAULT_TOKEN") or None,
            role_id=os.environ.get("BAO_ROLE_ID") or None,
            secret_id=os.environ.get("BAO_SECRET_ID") or None,
            timeout_s=float(os.environ.get("SANDBOXER_BAO_TIMEOUT_S") or 5.0),
            cache_ttl_s=float(os.environ.get("SANDBOXER_BAO_CACHE_TTL_S") or 30.0),
        )
