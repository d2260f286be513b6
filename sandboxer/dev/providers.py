"""`sandboxer dev --fake-e2b --fake-modal`: the providers faked on loopback, with a dev
OpenBao (in memory) holding the platform keys their manifests' `secret_ref` name, and
the worker's settings pointed at all of them. For trying the cloud adapters offline;
never used in production.

The worker is configured through the `Settings` this returns. Modal's client is the
exception: it reads its server URL only from its own `MODAL_SERVER_URL` variable, so
that one (and `MODAL_DISABLE_API_PROXY`, to keep 127.0.0.1 off any proxy) is set in
this process's environment.

Commands in another shell (`route explain`, `reconcile`) need the same: the variables
returned as `FakeProviders.env`, with an OpenBao token that may only read keys (the
worker keeps the root token), which `sandboxer dev` writes to `<state-dir>/dev.env`."""

from __future__ import annotations

import os
import secrets
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import hvac

from adapters.registry import Registry
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.settings import BaoSettings, Settings


@dataclass(frozen=True)
class FakeProviders:
    """The worker's settings that use the fakes, a line about each, and the variables
    another process needs to reach them (a read-only OpenBao token)."""

    settings: Settings
    said: list[str]
    env: dict[str, str]


_READ_KEYS = 'path "{mount}/data/*" {{ capabilities = ["read"] }}\n'


def start_fake_providers(
    stack: ExitStack, settings: Settings, state_dir: Path, *, e2b: bool, modal: bool
) -> FakeProviders:
    """Start what is asked for (closed with `stack`)."""
    registry = Registry.load(settings.extensions_dir)
    token = secrets.token_hex(16)
    bao = stack.enter_context(EmbeddedOpenBao(state_dir / "openbao", root_token=token))
    admin = hvac.Client(url=bao.url, token=token)
    adapter_env = dict(settings.adapter_env)
    said = [f"dev OpenBao on {bao.url} (in memory) holds the platform keys"]
    mounts = {m.secret_ref.mount for m in registry.extensions.values() if m.secret_ref}
    admin.sys.create_or_update_policy(
        name="sandboxer-dev-reader", policy="".join(_READ_KEYS.format(mount=m) for m in mounts)
    )
    reader = admin.auth.token.create(policies=["sandboxer-dev-reader"], ttl="24h")
    env = {"BAO_ADDR": bao.url, "BAO_TOKEN": reader["auth"]["client_token"]}

    def keep(extension_id: str, values: dict[str, str]) -> str:
        ref = registry.extensions[extension_id].secret_ref
        assert ref is not None
        admin.secrets.kv.v2.create_or_update_secret(
            path=ref.path, secret=values, mount_point=ref.mount
        )
        return f"{ref.mount}/{ref.path}"

    if e2b:
        from sandboxer.dev.fakes.e2b import FakeE2B

        api_key = "e2b_" + secrets.token_hex(20)
        fake_e2b = stack.enter_context(FakeE2B(api_keys={api_key}))
        e2b_env = {
            "SANDBOXER_E2B_API_URL": fake_e2b.url,
            # The fake's edge speaks plain HTTP on loopback, where E2B's speaks TLS.
            "SANDBOXER_E2B_TRAFFIC_SCHEME": "http",
        }
        adapter_env.update(e2b_env)
        env.update(e2b_env)
        where = keep("ext.e2b", {"api_key": api_key})
        said.append(
            f"fake E2B API on {fake_e2b.url}, sandboxes' ports on {fake_e2b.domain}; "
            f"its key at {where}"
        )
    if modal:
        from sandboxer.dev.fakes.modal import FakeModal, FakeModalState

        state = FakeModalState(
            token_id="ak-" + secrets.token_hex(8), token_secret="as-" + secrets.token_hex(16)
        )
        fake_modal = stack.enter_context(FakeModal(state))
        modal_env = {"MODAL_SERVER_URL": fake_modal.url, "MODAL_DISABLE_API_PROXY": "1"}
        os.environ.update(modal_env)
        env.update(modal_env)
        # Its tunnels are plain HTTP on loopback, where Modal's speak TLS.
        adapter_env["SANDBOXER_MODAL_TUNNEL_SCHEME"] = "http"
        env["SANDBOXER_MODAL_TUNNEL_SCHEME"] = "http"
        where = keep("ext.modal", {"token_id": state.token_id, "token_secret": state.token_secret})
        said.append(f"fake Modal API (gRPC) on {fake_modal.url}; its token at {where}")
    changed = replace(settings, bao=BaoSettings(addr=bao.url, token=token), adapter_env=adapter_env)
    return FakeProviders(changed, said, env)
