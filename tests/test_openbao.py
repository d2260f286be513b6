"""Provider keys from a real OpenBao dev server: BYOK wins, tenants never share a key,
rotation and outages are survived."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import hvac
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.openbao import CredentialResolver
from adapters.registry import Registry
from adapters.routing import Router
from sandboxer.dev.servers import EmbeddedOpenBao
from sandboxer.errors import ProviderUnavailable
from sandboxer.settings import BaoSettings, default_extensions_dir
from schemas import SandboxState, SandboxStatus, SecretRef, byok_path, utcnow
from tests.conftest import OPENBAO_ROOT_TOKEN


@pytest.fixture
def admin(openbao: EmbeddedOpenBao) -> hvac.Client:
    return hvac.Client(url=openbao.url, token=OPENBAO_ROOT_TOKEN)


@pytest.fixture
def ref() -> SecretRef:
    """A platform key path of this test's own."""
    return SecretRef(path=f"sandboxer/platform/{uuid.uuid4().hex}", keys=["api_key"])


@pytest.fixture
def resolver(openbao: EmbeddedOpenBao) -> Iterator[CredentialResolver]:
    # No caching, so every test sees OpenBao's current answer.
    bao = CredentialResolver(
        BaoSettings(addr=openbao.url, token=OPENBAO_ROOT_TOKEN, cache_ttl_s=0, timeout_s=1.0)
    )
    yield bao
    bao.close()


def put(admin: hvac.Client, path: str, **values: str) -> None:
    admin.secrets.kv.v2.create_or_update_secret(path=path, secret=values, mount_point="secret")


async def test_platform_key_when_the_tenant_has_none(
    admin: hvac.Client, resolver: CredentialResolver, ref: SecretRef
) -> None:
    put(admin, ref.path, api_key="platform-placeholder")
    key = await resolver.resolve("acme", "ext.e2b", ref)
    assert key is not None and key.source == "platform"
    assert key.credentials.values == {"api_key": "platform-placeholder"}
    assert key.path == f"secret/{ref.path}" and key.version == 1
    assert "platform-placeholder" not in repr(key)  # values never print
    assert "platform-placeholder" not in repr(resolver._cache)  # cached reads neither


async def test_tenant_key_wins_over_platform_key(
    admin: hvac.Client, resolver: CredentialResolver, ref: SecretRef
) -> None:
    tenant = f"t{uuid.uuid4().hex[:12]}"
    put(admin, ref.path, api_key="platform-placeholder")
    put(admin, byok_path(tenant, "ext.e2b"), api_key="byok-placeholder")
    key = await resolver.resolve(tenant, "ext.e2b", ref)
    assert key is not None and key.source == "byok"
    assert key.credentials.values == {"api_key": "byok-placeholder"}
    assert key.path == f"secret/sandboxer/tenants/{tenant}/ext.e2b"


async def test_no_key_at_all_resolves_to_none(resolver: CredentialResolver, ref: SecretRef) -> None:
    assert await resolver.resolve("acme", "ext.e2b", ref) is None


async def test_pinned_version_survives_rotation_and_falls_back_when_destroyed(
    admin: hvac.Client, resolver: CredentialResolver, ref: SecretRef
) -> None:
    put(admin, ref.path, api_key="v1-placeholder")
    created = await resolver.resolve("acme", "ext.e2b", ref)
    assert created is not None and created.version == 1
    put(admin, ref.path, api_key="v2-placeholder")  # rotated between create and destroy
    pinned = await resolver.read("secret", ref.path, ["api_key"], "platform", version=1)
    assert pinned is not None and pinned.credentials.values["api_key"] == "v1-placeholder"
    admin.secrets.kv.v2.destroy_secret_versions(path=ref.path, versions=[1], mount_point="secret")
    fallback = await resolver.read("secret", ref.path, ["api_key"], "platform", version=1)
    assert fallback is not None and fallback.version == 2
    assert fallback.credentials.values["api_key"] == "v2-placeholder"


async def test_approle_login_reads_keys(
    openbao: EmbeddedOpenBao, admin: hvac.Client, ref: SecretRef
) -> None:
    if "approle/" not in admin.sys.list_auth_methods():
        admin.sys.enable_auth_method("approle")
    admin.sys.create_or_update_policy(
        "sandboxer-read", 'path "secret/data/sandboxer/*" { capabilities = ["read"] }'
    )
    admin.auth.approle.create_or_update_approle("sandboxer", token_policies=["sandboxer-read"])
    role_id = admin.auth.approle.read_role_id("sandboxer")["data"]["role_id"]
    secret_id = admin.auth.approle.generate_secret_id("sandboxer")["data"]["secret_id"]
    put(admin, ref.path, api_key="approle-placeholder")
    bao = CredentialResolver(BaoSettings(addr=openbao.url, role_id=role_id, secret_id=secret_id))
    key = await bao.resolve("acme", "ext.e2b", ref)
    assert key is not None and key.credentials.values["api_key"] == "approle-placeholder"
    assert "secret_id" not in repr(bao.settings) and secret_id not in repr(bao.settings)
    bao.close()


async def test_openbao_unreachable_is_provider_unavailable_then_recovers(
    openbao: EmbeddedOpenBao, admin: hvac.Client, resolver: CredentialResolver, ref: SecretRef
) -> None:
    put(admin, ref.path, api_key="outage-placeholder")
    with openbao.frozen():  # stopped: connections hang, then time out
        with pytest.raises(ProviderUnavailable, match="unavailable") as error:
            await resolver.resolve("acme", "ext.e2b", ref)
        assert "placeholder" not in str(error.value) and OPENBAO_ROOT_TOKEN not in str(error.value)
    key = await resolver.resolve("acme", "ext.e2b", ref)
    assert key is not None and key.credentials.values["api_key"] == "outage-placeholder"


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    tenants=st.lists(
        st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True), min_size=2, max_size=5, unique=True
    ),
    has_own_key=st.lists(st.booleans(), min_size=5, max_size=5),
)
async def test_a_tenant_never_gets_another_tenants_key(
    admin: hvac.Client, resolver: CredentialResolver, tenants: list[str], has_own_key: list[bool]
) -> None:
    run = uuid.uuid4().hex[:8]
    ref = SecretRef(path=f"sandboxer/platform/{run}", keys=["api_key"])
    put(admin, ref.path, api_key=f"platform-{run}")
    owners = {t for t, own in zip(tenants, has_own_key, strict=False) if own}
    for tenant in owners:
        put(admin, byok_path(f"{tenant}-{run}", "ext.e2b"), api_key=f"key-of-{tenant}-{run}")
    for tenant in tenants:
        key = await resolver.resolve(f"{tenant}-{run}", "ext.e2b", ref)
        assert key is not None
        expected = f"key-of-{tenant}-{run}" if tenant in owners else f"platform-{run}"
        assert key.credentials.values["api_key"] == expected


async def test_destroy_reads_the_key_where_tenant_and_extension_say_not_where_the_status_says(
    admin: hvac.Client, resolver: CredentialResolver, ref: SecretRef
) -> None:
    """Whoever could write a status must not choose which key a worker uses."""
    manifest = Registry.load(default_extensions_dir()).extensions["ext.e2b"]
    manifest = manifest.model_copy(update={"secret_ref": ref})
    put(admin, ref.path, api_key="platform-placeholder")
    put(admin, byok_path("victim", "ext.e2b"), api_key="victims-own-key")
    router = Router({}, {"ext.e2b": manifest}, resolver)
    tampered = SandboxStatus(
        sandbox_id="sbx-" + "c" * 24,
        request_id="r",
        tenant="mallory",
        profile="profile.e2b-burst",
        extension_id="ext.e2b",
        state=SandboxState.READY,
        created_at=utcnow(),
        credential_source="platform",
        credential_path=f"secret/{byok_path('victim', 'ext.e2b')}",
    )
    credentials = await router.credentials(tampered)
    assert credentials.values == {"api_key": "platform-placeholder"}
    byok = tampered.with_changes(credential_source="byok")
    with pytest.raises(ProviderUnavailable, match="mallory"):  # mallory has no key of her own
        await router.credentials(byok)
