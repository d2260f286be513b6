"""extensions/ is validated at start-up; a wrong file is named with its wrong field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapters.base import AdapterContext, SandboxAdapter
from adapters.registry import Registry
from adapters.routing import Router
from adapters.saas_stub import SaasStubAdapter
from sandboxer.errors import ManifestError, NoRoute, UnknownProfile
from sandboxer.settings import Settings, default_extensions_dir
from schemas import Profile, TtlLimits


@pytest.fixture
def ext_dir(tmp_path: Path) -> Path:
    target = tmp_path / "extensions"
    shutil.copytree(default_extensions_dir(), target)
    return target


def test_shipped_extensions_load() -> None:
    registry = Registry.load(default_extensions_dir())
    assert "ext.saas-stub" in registry.extensions
    profile = registry.profile("profile.burst-sandbox")
    assert profile.routes[-1] == "ext.saas-stub"
    assert registry.extensions["ext.saas-stub"].pricing.pricing_model == "metered"


def test_unknown_profile_is_a_coded_error() -> None:
    with pytest.raises(UnknownProfile):
        Registry.load(default_extensions_dir()).profile("profile.nope")


@pytest.mark.parametrize(
    ("file", "old", "new", "named"),
    [
        (
            "ext.saas-stub.yaml",
            'usd_per_second: "0.000010"',
            "usd_per_second: 0.1",
            "pricing.rates.usd_per_second",
        ),
        (
            "ext.saas-stub.yaml",
            'usd_per_second: "0.000010"',
            'per_hour: "1"',
            "pricing.rates.usd_per_second",
        ),
        (
            "ext.saas-stub.yaml",
            "pricing_model: metered",
            "pricing_model: flat",
            "pricing.pricing_model",
        ),
        ("ext.saas-stub.yaml", "latency_s: 0", "latency_s: -1", "config.latency_s"),
        ("ext.saas-stub.yaml", "adapters.saas_stub:SaasStubAdapter", "adapters.nope:X", "adapter"),
        ("profile.burst-sandbox.yaml", "default_s: 900", "default_s: 999999", "ttl"),
        ("profile.burst-sandbox.yaml", "routes: [", "routez: [", "routes"),
    ],
)
def test_wrong_manifest_names_file_and_field(
    ext_dir: Path, file: str, old: str, new: str, named: str
) -> None:
    path = ext_dir / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    with pytest.raises(ManifestError) as error:
        Registry.load(ext_dir)
    assert file in str(error.value)
    assert named in str(error.value)


def test_id_must_match_file_name(ext_dir: Path) -> None:
    (ext_dir / "ext.saas-stub.yaml").rename(ext_dir / "ext.other.yaml")
    with pytest.raises(ManifestError, match=r"ext\.other\.yaml: id"):
        Registry.load(ext_dir)


def test_yaml_syntax_error_names_the_file(ext_dir: Path) -> None:
    (ext_dir / "profile.burst-sandbox.yaml").write_text("kind: [unclosed")
    with pytest.raises(ManifestError, match=r"profile\.burst-sandbox\.yaml: not valid YAML"):
        Registry.load(ext_dir)


def stub_adapter() -> SandboxAdapter:
    """A stub adapter that is never called (routing only looks at which exist)."""
    manifest = Registry.load(default_extensions_dir()).extensions["ext.saas-stub"]
    return SaasStubAdapter(AdapterContext(manifest, Settings()))


async def test_router_skips_uninstalled_extensions_and_falls_to_the_stub() -> None:
    registry = Registry.load(default_extensions_dir())
    stub = stub_adapter()
    router = Router({"ext.saas-stub": stub})
    profile = registry.profile("profile.burst-sandbox")
    route = await router.choose(profile, "acme")
    assert route.extension_id == "ext.saas-stub" and route.adapter is stub
    assert [ext for ext, _ in route.skipped] == profile.routes[:-1]
    assert route.credentials.source == "none"


async def test_router_without_any_adapter_is_no_route() -> None:
    registry = Registry.load(default_extensions_dir())
    with pytest.raises(NoRoute, match=r"ext\.saas-stub: extension not installed"):
        await Router({}).choose(registry.profile("profile.burst-sandbox"), "acme")


async def test_a_pinned_tenant_gets_its_extension_or_no_route() -> None:
    profile = Profile(
        kind="profile",
        id="profile.pinned",
        pricing_model="metered",
        routes=["ext.a", "ext.b"],
        ttl=TtlLimits(default_s=60, max_s=600),
        pins={"vip": "ext.b", "stuck": "ext.a"},
    )
    a, b = stub_adapter(), stub_adapter()
    router = Router({"ext.a": a, "ext.b": b})
    assert (await router.choose(profile, "anyone")).adapter is a
    assert (await router.choose(profile, "vip")).adapter is b
    with pytest.raises(NoRoute, match=r"ext\.a: extension not installed"):
        await Router({"ext.b": b}).choose(profile, "stuck")


def test_pins_must_name_a_route() -> None:
    with pytest.raises(ValueError, match=r"pins name extensions not in routes: ext\.c"):
        Profile(
            kind="profile",
            id="profile.pinned",
            pricing_model="metered",
            routes=["ext.a"],
            ttl=TtlLimits(default_s=60, max_s=600),
            pins={"vip": "ext.c"},
        )


async def test_an_adapter_without_its_optional_package_is_left_out(
    ext_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (ext_dir / "ext.needs-missing.yaml").write_text(
        "kind: extension\nid: ext.needs-missing\nname: needs a package\n"
        "adapter: tests.fake_adapters:NeedsAMissingPackage\n"
        "pricing: {pricing_model: metered, rates: {usd_per_second: '0.000001'}}\n"
    )
    registry = Registry.load(ext_dir)
    adapters = registry.build_adapters(Settings(extensions_dir=ext_dir))
    assert "ext.needs-missing" not in adapters and "ext.saas-stub" in adapters
    assert "ext.needs-missing skipped: it needs the 'sandboxer_no_such_package'" in caplog.text
    for adapter in adapters.values():
        await adapter.aclose()
