"""How a requester reaches its sandbox: the ports a profile declares, the endpoints a
`ready` status announces (no secret in them), and the connect exchange on
`sandbox.connect.<owner>.<sandbox_id>` that hands the credentials out (docs/reachability.md).

Credentials travel only in a `ConnectGrant`, the reply to a core-NATS request, which no
stream records; they never go into a status, a stream, a KV entry, a log or an error.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_serializer, model_validator

from schemas._types import SandboxId, TenantId, Timestamp

#: What a client speaks to an endpoint: `http` is plain text, `https`/`wss`/`h2` TLS,
#: `tcp` a raw stream.
PortProtocol = Literal["http", "https", "wss", "h2", "tcp"]

#: How a client presents its credential: none, a named header, `Authorization: Bearer`,
#: or a named query parameter.
AuthScheme = Literal["none", "header", "bearer", "query"]

PortNumber = Annotated[int, Field(ge=1, le=65535)]


class Port(BaseModel):
    """A port a sandbox of the profile serves. Private unless `public`: a private port
    is reached only with a credential from `sandbox.connect`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: PortNumber
    protocol: PortProtocol = "http"
    public: bool = False


def unique_ports(ports: list[Port]) -> list[Port]:
    """`ports`, refused if a number repeats."""
    numbers = [p.port for p in ports]
    if len(set(numbers)) != len(numbers):
        raise ValueError("ports must not repeat a port number")
    return ports


class Endpoint(BaseModel):
    """Where one declared port is reached, and how to authenticate (never the secret)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: PortNumber = Field(description="The sandbox's own port.")
    protocol: PortProtocol
    public: bool
    url: str | None = Field(
        default=None,
        max_length=512,
        description="The URL to use; null for `tcp` (use host and host_port), or when "
        "the URL comes with the credential (a Modal private port).",
    )
    host: str | None = Field(default=None, max_length=256)
    host_port: PortNumber | None = None
    auth: AuthScheme = "none"
    auth_name: str | None = Field(
        default=None,
        max_length=64,
        description="The header or query parameter that carries the credential.",
    )
    credential_expires_at: Timestamp | None = Field(
        default=None, description="When a credential for it stops working (the sandbox's end)."
    )


class ControlEndpoint(BaseModel):
    """The provider's own control API of the sandbox (E2B's envd: commands, files), if
    the provider has one a requester may use without the provider account's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["e2b-envd"]
    url: str = Field(max_length=512)
    auth: AuthScheme
    auth_name: str | None = Field(default=None, max_length=64)
    #: What the provider's SDK needs besides the URL and the credential.
    sdk: dict[str, str] = Field(default_factory=dict, max_length=8)
    credential_expires_at: Timestamp | None = None


class ConnectRequest(BaseModel):
    """Ask for the credentials of a sandbox, by core-NATS request on
    `sandbox.connect.<owner>.<sandbox_id>` (only the owner's identity may publish there)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    tenant: TenantId
    port: PortNumber | None = Field(default=None, description="Only this port (and no control).")


class Credential(BaseModel):
    """One endpoint and the secret that opens it. `secret` shows as `**********` in
    every repr and log; only the JSON of a reply carries it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    port: PortNumber | None = Field(description="The sandbox port; null for the control API.")
    url: str | None = Field(default=None, max_length=2048)
    host: str | None = Field(default=None, max_length=256)
    host_port: PortNumber | None = None
    auth: AuthScheme
    auth_name: str | None = Field(default=None, max_length=64)
    secret: SecretStr | None = Field(default=None, description="None when auth is `none`.")
    expires_at: Timestamp | None = None

    @model_validator(mode="after")
    def _secret_iff_auth(self) -> Self:
        if (self.auth == "none") != (self.secret is None):
            raise ValueError("a credential has a secret exactly when its auth is not none")
        return self

    @field_serializer("secret", when_used="json")
    def _reveal(self, secret: SecretStr | None) -> str | None:
        return secret.get_secret_value() if secret else None


class ConnectGrant(BaseModel):
    """The reply to a ConnectRequest: each endpoint asked for, with its credential."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    sandbox_id: SandboxId
    credentials: list[Credential] = Field(max_length=32)
    control: Credential | None = None
    control_sdk: dict[str, str] = Field(
        default_factory=dict, description="What the provider's SDK needs (E2B: domain, envd)."
    )
