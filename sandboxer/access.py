"""Who may do what on the bus: the roles of a deployment, their least-privilege subject
permissions, and `sandboxer security generate`, which writes the nats-server
authorization and one nkey identity per role (docs/security.md).

One account, one user per identity, each with allow-lists for what it may publish and
subscribe to. Users with permissions, not accounts with exports, because every
sandboxer process shares the same JetStream streams: with accounts, each upstream
account would need stream and service imports of its own subjects mapped back into
sandboxer's account, and the permissions below would have to be written twice (as
exports and imports). nkeys, because they need no other tool (a seed is 32 random
bytes) and no secret is stored in the server's configuration, only public keys.
Deployments that run NATS decentralized auth (JWT accounts made with `nsc`) give each
process a creds file instead and apply the same permission sets to its user JWT.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sandboxer.topology import (
    ADVISORY_STREAM,
    BILLING_BUCKET,
    BILLING_STREAM,
    CHECKPOINT_SUBJECT_PREFIX,
    CONNECT_SUBJECT_PREFIX,
    DESTROY_SUBJECT,
    DLQ_SUBJECT_PREFIX,
    LEASE_BUCKET,
    LEDGER_SUBJECT_PREFIX,
    METER_STREAM,
    METER_SUBJECT_PREFIX,
    REQUESTS_STREAM,
    SCHEDULE_SUBJECT_PREFIX,
    STATUS_BUCKET,
    STATUS_SUBJECT_PREFIX,
    STUB_BUCKET,
    TEMPLATE_BUCKET,
    TEMPLATE_STATUS_PREFIX,
    TEMPLATE_STREAM,
    USAGE_SUBJECT,
    destroy_subject,
    extend_subject,
    provision_subject,
)


@dataclass(frozen=True)
class Permissions:
    """What one identity may publish and subscribe to (nats-server allow-lists)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    #: May answer the requests it receives (once each, on their reply subject),
    #: wherever the reply goes: the worker, answering connect requests.
    allow_responses: bool = False


def inbox_prefix(identity: str) -> str:
    """Where replies to `identity` go; nobody else may subscribe there."""
    return f"_INBOX.{identity}"


def _ledger(*kinds: str) -> tuple[str, ...]:
    return tuple(f"{LEDGER_SUBJECT_PREFIX}.*.{kind}.>" for kind in kinds)


def _kv(bucket: str, keys: str = ">") -> str:
    return f"$KV.{bucket}.{keys}"


def _acks(stream: str) -> str:
    return f"$JS.ACK.{stream}.>"


#: What every service process does with JetStream: keep the topology in place (streams,
#: buckets, its durable consumers), pull and read messages, and keep dead letters.
_SERVICE_API = (
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.*",
    "$JS.API.STREAM.CREATE.*",
    "$JS.API.STREAM.UPDATE.*",
    "$JS.API.STREAM.MSG.GET.*",
    "$JS.API.DIRECT.GET.>",
    "$JS.API.CONSUMER.CREATE.>",
    "$JS.API.CONSUMER.DURABLE.CREATE.>",
    "$JS.API.CONSUMER.INFO.>",
    "$JS.API.CONSUMER.DELETE.>",
    "$JS.API.CONSUMER.MSG.NEXT.>",
    f"{DLQ_SUBJECT_PREFIX}.*",
)

#: The service roles. The worker alone writes statuses, meter events, holds and TTL
#: schedules; billing alone writes debits and usage records; the exporter alone marks
#: records exported; the template worker alone writes the template catalogue; only an
#: operator grants credits and asks for template builds.
ROLES: dict[str, tuple[str, ...]] = {
    "worker": (
        *_SERVICE_API,
        "$JS.API.STREAM.PURGE." + REQUESTS_STREAM,  # cancelling a TTL schedule
        f"{SCHEDULE_SUBJECT_PREFIX}.*",
        DESTROY_SUBJECT,  # reconciliation's expiry of a sandbox past its TTL
        f"{METER_SUBJECT_PREFIX}.>",
        f"{STATUS_SUBJECT_PREFIX}.>",  # answers that are no stored status
        *_ledger("hold", "release"),
        f"{CHECKPOINT_SUBJECT_PREFIX}.*",
        _kv(STATUS_BUCKET),
        _kv(STUB_BUCKET),
        _kv(LEASE_BUCKET),
        _acks(REQUESTS_STREAM),
        _acks(ADVISORY_STREAM),
    ),
    "billing": (
        *_SERVICE_API,
        *_ledger("debit", "release"),
        f"{CHECKPOINT_SUBJECT_PREFIX}.*",
        USAGE_SUBJECT,
        _kv(BILLING_BUCKET, "usage.>"),
        _acks(METER_STREAM),
    ),
    "templates": (  # builds templates, registers them with the platform's keys
        *_SERVICE_API,
        f"{TEMPLATE_STATUS_PREFIX}.*",
        _kv(TEMPLATE_BUCKET),
        _kv(STUB_BUCKET, "template.>"),
        _acks(TEMPLATE_STREAM),
    ),
    "exporter": (
        *_SERVICE_API,
        _kv(BILLING_BUCKET, "exported.>"),
        _kv(BILLING_BUCKET, "dead.>"),
        _acks(BILLING_STREAM),
    ),
}
OPERATOR = "operator"


def permissions(identity: str) -> Permissions:
    """The permissions of a service role, the operator, or `consumer-<name>`."""
    if identity == OPERATOR:
        return Permissions(publish=(">",), subscribe=(">",))
    if identity == "worker":  # it also answers connect requests, and only those
        subscribe = (f"{inbox_prefix(identity)}.>", f"{CONNECT_SUBJECT_PREFIX}.*.*")
        return Permissions(ROLES[identity], subscribe, allow_responses=True)
    if identity in ROLES:
        return Permissions(ROLES[identity], (f"{inbox_prefix(identity)}.>",))
    if identity.startswith("consumer-"):
        return consumer_permissions(identity.removeprefix("consumer-"))
    raise ValueError(f"no role {identity!r}: {', '.join([*ROLES, OPERATOR])}, consumer-<name>")


def consumer_permissions(name: str) -> Permissions:
    """An upstream consumer publishes its own requests, asks for the credentials of its
    own sandboxes and reads its own statuses (live, and the last one of a sandbox by a
    direct get of its key); nothing else."""
    status_key = f"$KV.{STATUS_BUCKET}.{name}.>"
    return Permissions(
        publish=(
            provision_subject(name),
            destroy_subject(name),
            extend_subject(name),
            f"{CONNECT_SUBJECT_PREFIX}.{name}.*",
            f"$JS.API.DIRECT.GET.KV_{STATUS_BUCKET}.{status_key}",
        ),
        subscribe=(f"{STATUS_SUBJECT_PREFIX}.{name}.>", f"{inbox_prefix(f'consumer-{name}')}.>"),
    )


def identities(consumers: list[str]) -> list[str]:
    """Every identity of a deployment with these upstream consumers."""
    return [*ROLES, OPERATOR, *(f"consumer-{name}" for name in sorted(consumers))]


# -- generating them ------------------------------------------------------------------


def new_nkey_seed() -> tuple[str, str]:
    """(seed, public key) of a new user nkey."""
    import nkeys

    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    public: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return seed.decode(), public.decode()


def public_key_of(seed_file: Path) -> str:
    import nkeys

    public: bytes = nkeys.from_seed(bytearray(seed_file.read_bytes().strip())).public_key
    return public.decode()


def authorization_conf(keys: dict[str, str]) -> str:
    """nats-server's `authorization` block: one nkey user per identity (public keys
    only), each with its allow-lists."""
    users = []
    for identity, public in keys.items():
        allowed = permissions(identity)
        users.append(
            "    {\n"
            f"      # {identity}\n"
            f"      nkey: {public}\n"
            "      permissions: {\n"
            f"        publish: {{ allow: {json.dumps(list(allowed.publish))} }}\n"
            f"        subscribe: {{ allow: {json.dumps(list(allowed.subscribe))} }}\n"
            + ("        allow_responses: true\n" if allowed.allow_responses else "")
            + "      }\n"
            "    }"
        )
    return (
        "# Written by `sandboxer security generate`: who may publish and subscribe to what.\n"
        "# Include it from nats-server.conf; reload the server after a change.\n"
        "authorization {\n  users: [\n" + ",\n".join(users) + "\n  ]\n}\n"
    )


def env_file(identity: str, seed_file: Path) -> str:
    """The environment of a process running as `identity`."""
    lines = [
        f"SANDBOXER_NATS_NKEY={seed_file.resolve()}",
        f"SANDBOXER_NATS_INBOX_PREFIX={inbox_prefix(identity)}",
    ]
    if identity.startswith("consumer-"):
        lines.append(f"SANDBOXER_CONSUMER={identity.removeprefix('consumer-')}")
    return "\n".join(lines) + "\n"


def generate(directory: Path, consumers: list[str], *, rotate: tuple[str, ...] = ()) -> list[Path]:
    """Write `nats-auth.conf` and, per identity, `<identity>.nk` (its nkey seed, mode
    0600) and `<identity>.env` into `directory`. Seeds already there are kept, unless
    `rotate` names their identity; identities no longer in the deployment lose their
    user. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    keys: dict[str, str] = {}
    written: list[Path] = []
    for identity in identities(consumers):
        seed_file = directory / f"{identity}.nk"
        if seed_file.exists() and identity not in rotate:
            keys[identity] = public_key_of(seed_file)
        else:
            seed, keys[identity] = new_nkey_seed()
            seed_file.touch(mode=0o600)
            seed_file.write_text(seed + "\n")
            written.append(seed_file)
        env = directory / f"{identity}.env"
        env.write_text(env_file(identity, seed_file))
        written.append(env)
    unknown = set(rotate) - set(keys)
    if unknown:
        raise ValueError(f"no identity {', '.join(sorted(unknown))} in this deployment")
    conf = directory / "nats-auth.conf"
    conf.write_text(authorization_conf(keys))
    written.append(conf)
    return written


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an `<identity>.env` file."""
    found = {}
    for line in path.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            found[name.strip()] = value.strip()
    return found
