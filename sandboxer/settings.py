"""Configuration from the environment (SPEC "Configuration"), read once at start-up.

This is the only module that reads `os.environ`: everything else is handed a
`Settings`. Adapters get theirs through `AdapterContext`, including the
`SANDBOXER_<PREFIX>_<FIELD>` variables that override their manifest's `config`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """An environment variable holds a value sandboxer cannot use; the message names it."""


def default_extensions_dir() -> Path:
    """`extensions/` of the source tree, or the copy packed into a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "extensions", here / "_extensions"):
        if candidate.is_dir():
            return candidate
    return here.parent / "extensions"


#: What a Packer build may see of the template worker's environment (docs/templates.md):
#: no OpenBao token, no NATS key, no provider key.
PACKER_PASSED = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "LC_ALL", "USER"})
PACKER_PASSED_PREFIXES = ("PACKER_", "PKR_VAR_")


def packer_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The part of `environ` a Packer build gets."""
    return {
        name: value
        for name, value in environ.items()
        if name in PACKER_PASSED or name.startswith(PACKER_PASSED_PREFIXES)
    }


def servers_of(url: str) -> list[str]:
    """`nats://a:4222,nats://b:4222` as a list of server URLs."""
    return [part.strip() for part in url.split(",") if part.strip()]


def redact_url(url: str) -> str:
    """Server URLs with any `user:password@` (or token) blanked: `nats://***@host`."""
    return ",".join(re.sub(r"//[^@/]*@", "//***@", part) for part in servers_of(url))


#: The standard variables that turn an OpenTelemetry exporter on.
_OTEL_ON = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_EXPORTER",
)


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """Whether the standard `OTEL_*` variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        return False
    return any(environ.get(name) for name in _OTEL_ON)


class _Environment:
    """Typed reads of one environment snapshot, with errors that name the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def text(self, *names: str) -> str | None:
        """The first of `names` that is set and not empty."""
        for name in names:
            value = self._environ.get(name)
            if value:
                return value
        return None

    def address(self, name: str) -> tuple[str, int] | None:
        """`host:port` (`:9464` is every interface) as a pair, or None if unset."""
        raw = self.text(name)
        if raw is None:
            return None
        host, sep, port = raw.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(f"{name}={raw!r} is not host:port (e.g. 127.0.0.1:9464)")
        return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - what ':port' says

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        """One of `choices` (the first is the default)."""
        raw = (self.text(name) or choices[0]).lower()
        if raw not in choices:
            raise SettingsError(f"{name}={raw!r}: use one of {', '.join(choices)}")
        return raw

    def number(self, name: str, default: float) -> float:
        raw = self.text(name)
        try:
            return default if raw is None else float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None

    def whole(self, name: str, default: int) -> int:
        raw = self.text(name)
        try:
            return default if raw is None else int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a whole number") from None

    def prefixed(self, prefix: str) -> dict[str, str]:
        return {k: v for k, v in self._environ.items() if k.startswith(prefix) and v}


@dataclass(frozen=True, kw_only=True)
class NatsAuth:
    """How a process proves who it is to nats-server (any one of a creds file, an nkey
    seed file, a user and password, a token; TLS with a custom CA and a client
    certificate on top), and the inbox prefix its permissions allow. Never printed:
    `repr` names the methods in use, not the secrets."""

    #: A NATS decentralized-auth creds file (user JWT + nkey seed).
    creds_file: Path | None = None
    #: A file holding an nkey seed (`SU...`), as `sandboxer security generate` writes.
    nkey_seed_file: Path | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    #: CA bundle to verify the server with; a client certificate and its key.
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Replies to this process go to `<inbox_prefix>.<id>`: its permissions allow
    #: subscribing there and nowhere else another identity's replies could land.
    inbox_prefix: str | None = None

    def __repr__(self) -> str:
        used = [
            name
            for name, value in (
                ("creds", self.creds_file),
                ("nkey", self.nkey_seed_file),
                ("user", self.user),
                ("token", self.token),
                ("tls", self.tls_ca or self.tls_cert),
            )
            if value
        ]
        return f"NatsAuth({', '.join(used) or 'none'}, inbox={self.inbox_prefix or '_INBOX'})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NatsAuth:
        """From `SANDBOXER_NATS_CREDS`, `_NKEY`, `_USER` + `_PASSWORD`, `_TOKEN`,
        `_TLS_CA`, `_TLS_CERT` + `_TLS_KEY` and `_INBOX_PREFIX`."""
        env = _Environment(os.environ if environ is None else environ)

        def path(name: str) -> Path | None:
            value = env.text(f"SANDBOXER_NATS_{name}")
            return Path(value) if value else None

        auth = cls(
            creds_file=path("CREDS"),
            nkey_seed_file=path("NKEY"),
            user=env.text("SANDBOXER_NATS_USER"),
            password=env.text("SANDBOXER_NATS_PASSWORD"),
            token=env.text("SANDBOXER_NATS_TOKEN"),
            tls_ca=path("TLS_CA"),
            tls_cert=path("TLS_CERT"),
            tls_key=path("TLS_KEY"),
            inbox_prefix=env.text("SANDBOXER_NATS_INBOX_PREFIX"),
        )
        if bool(auth.tls_cert) != bool(auth.tls_key):
            raise SettingsError("SANDBOXER_NATS_TLS_CERT and SANDBOXER_NATS_TLS_KEY go together")
        for name, file in (
            ("SANDBOXER_NATS_CREDS", auth.creds_file),
            ("SANDBOXER_NATS_NKEY", auth.nkey_seed_file),
            ("SANDBOXER_NATS_TLS_CA", auth.tls_ca),
            ("SANDBOXER_NATS_TLS_CERT", auth.tls_cert),
            ("SANDBOXER_NATS_TLS_KEY", auth.tls_key),
        ):
            if file is not None and not file.is_file():
                raise SettingsError(f"{name}={file}: no such file")
        return auth


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
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BaoSettings | None:
        """From `BAO_ADDR`/`VAULT_ADDR`, `BAO_TOKEN`/`VAULT_TOKEN` or
        `BAO_ROLE_ID` + `BAO_SECRET_ID`; None when no address is set."""
        env = _Environment(os.environ if environ is None else environ)
        addr = env.text("BAO_ADDR", "VAULT_ADDR")
        if not addr:
            return None
        return cls(
            addr=addr,
            token=env.text("BAO_TOKEN", "VAULT_TOKEN"),
            role_id=env.text("BAO_ROLE_ID"),
            secret_id=env.text("BAO_SECRET_ID"),
            timeout_s=env.number("SANDBOXER_BAO_TIMEOUT_S", cls.timeout_s),
            cache_ttl_s=env.number("SANDBOXER_BAO_CACHE_TTL_S", cls.cache_ttl_s),
        )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything a worker or the CLI needs to know about its surroundings. Safe to
    log: `repr` leaves the secrets out."""

    nats_url: str = field(default="nats://127.0.0.1:4222", repr=False)
    #: How this process authenticates to NATS (none: the zero-config default).
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    #: The upstream consumer a CLI publishes for (`sandbox.provision.<consumer>`);
    #: None: the plain subjects, for trusted identities.
    consumer: str | None = None
    #: Tag on every provider sandbox; reconciliation never touches another deployment's.
    deployment: str = "default"
    extensions_dir: Path = field(default_factory=default_extensions_dir)
    #: Provision and destroy handlers running at once, per worker process and subject.
    max_in_flight: int = 256
    #: Requests a worker holds beyond those, queued by consumer and tenant so that
    #: the slots are shared fairly (a tenant's backlog never delays another's).
    max_queued: int = 20_000
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
    #: The bearer token for fin-hub (never printed).
    fin_hub_token: str | None = field(default=None, repr=False)
    #: Seconds one POST to fin-hub may take before it counts as failed (and is retried).
    fin_hub_timeout_s: float = 10.0
    #: JetStream replicas of every stream and bucket (3 on a cluster).
    replicas: int = 1
    #: Seconds between a worker's orphan reconciliation passes (0: never).
    reconcile_every_s: float = 300.0
    #: Seconds a claim or an expiry is given before reconciliation acts on it.
    reconcile_grace_s: float = 120.0
    #: Seconds between a template worker's polls of a provider's template build.
    template_poll_s: float = 5.0
    #: Seconds one `packer build` may take, and one provider's build of a template.
    template_build_timeout_s: float = 3600.0
    #: The Packer binary the template worker runs (looked for on PATH).
    packer: str = "packer"
    #: What Packer's child process gets of this one's environment: no secret of ours.
    packer_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: OpenBao, for provider keys; None: only extensions that need no key can be used.
    bao: BaoSettings | None = None
    #: `SANDBOXER_*` variables as read at start-up, for adapters' config overrides.
    adapter_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    #: Test hook (`SANDBOXER_FAULT_INJECT`): a named crash the billing consumer stages.
    fault_inject: str = ""
    #: `host:port` where a service serves Prometheus metrics; None: not served.
    metrics_addr: tuple[str, int] | None = None
    #: `text` or `json` (one object a line, with sandbox_id, tenant and trace_id).
    log_format: str = "text"
    #: Traces on: an `OTEL_*` variable that configures an exporter is set (and the SDK
    #: is not disabled). The OpenTelemetry SDK reads the rest of `OTEL_*` itself.
    tracing: bool = False
    #: Where spans go when traced: `otlp` (`OTEL_EXPORTER_OTLP_*`) or `console`.
    trace_exporter: str = "otlp"

    @property
    def nats_servers(self) -> list[str]:
        """`nats_url` as a list: several servers of a cluster may be given, comma-separated."""
        return servers_of(self.nats_url)

    @property
    def nats_where(self) -> str:
        """`nats_url` fit for a log line: any password in it blanked out."""
        return redact_url(self.nats_url)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{name}={getattr(self, name)!r}"
            for name, spec in self.__dataclass_fields__.items()
            if spec.repr
        )
        return f"Settings(nats={self.nats_where!r}, {shown})"

    def config_overrides(self, prefix: str, fields: list[str]) -> dict[str, str]:
        """`{field: value}` for each `<prefix><FIELD>` variable that is set: how an
        operator overrides an adapter's manifest `config` (`SANDBOXER_E2B_API_URL`)."""
        found = {}
        for name in fields:
            value = self.adapter_env.get(f"{prefix}{name.upper()}")
            if value:
                found[name] = value
        return found

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from `SANDBOXER_*`, `BAO_*` and `VAULT_*` variables, defaults for the
        rest; `SettingsError` names a variable whose value is unusable."""
        source = os.environ if environ is None else environ
        env = _Environment(source)
        return cls(
            nats_url=env.text("SANDBOXER_NATS_URL") or "nats://127.0.0.1:4222",
            nats_auth=NatsAuth.from_env(source),
            consumer=env.text("SANDBOXER_CONSUMER"),
            deployment=env.text("SANDBOXER_DEPLOYMENT") or cls.deployment,
            extensions_dir=Path(env.text("SANDBOXER_EXTENSIONS_DIR") or default_extensions_dir()),
            max_in_flight=env.whole("SANDBOXER_MAX_IN_FLIGHT", cls.max_in_flight),
            max_queued=env.whole("SANDBOXER_MAX_QUEUED", cls.max_queued),
            ack_wait_s=env.number("SANDBOXER_ACK_WAIT_S", cls.ack_wait_s),
            max_deliver=env.whole("SANDBOXER_MAX_DELIVER", cls.max_deliver),
            retry_backoff_s=env.number("SANDBOXER_RETRY_BACKOFF_S", cls.retry_backoff_s),
            retry_cap_s=env.number("SANDBOXER_RETRY_CAP_S", cls.retry_cap_s),
            drain_timeout_s=env.number("SANDBOXER_DRAIN_TIMEOUT_S", cls.drain_timeout_s),
            fin_hub_url=env.text("SANDBOXER_FIN_HUB_URL"),
            fin_hub_token=env.text("SANDBOXER_FIN_HUB_TOKEN"),
            fin_hub_timeout_s=env.number("SANDBOXER_FIN_HUB_TIMEOUT_S", cls.fin_hub_timeout_s),
            replicas=env.whole("SANDBOXER_REPLICAS", cls.replicas),
            reconcile_every_s=env.number("SANDBOXER_RECONCILE_EVERY_S", cls.reconcile_every_s),
            reconcile_grace_s=env.number("SANDBOXER_RECONCILE_GRACE_S", cls.reconcile_grace_s),
            template_poll_s=env.number("SANDBOXER_TEMPLATE_POLL_S", cls.template_poll_s),
            template_build_timeout_s=env.number(
                "SANDBOXER_TEMPLATE_BUILD_TIMEOUT_S", cls.template_build_timeout_s
            ),
            packer=env.text("SANDBOXER_PACKER") or cls.packer,
            packer_env=packer_environment(source),
            bao=BaoSettings.from_env(source),
            adapter_env=env.prefixed("SANDBOXER_"),
            fault_inject=env.text("SANDBOXER_FAULT_INJECT") or "",
            metrics_addr=env.address("SANDBOXER_METRICS_ADDR"),
            log_format=env.choice("SANDBOXER_LOG_FORMAT", ("text", "json")),
            tracing=tracing_configured(source),
            trace_exporter=env.choice("OTEL_TRACES_EXPORTER", ("otlp", "console", "none")),
        )
