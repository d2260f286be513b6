"""Where things live holds: the dev-only servers and fakes stay off the service's import
path, and settings are the only reader of the environment."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

SERVICE_MODULES = ("sandboxer.cli", "consumers.worker", "consumers.billing", "consumers.wiring")


def test_the_service_never_imports_the_dev_servers_or_fakes() -> None:
    probe = (
        f"import sys; import {', '.join(SERVICE_MODULES)}; "
        "print(sorted(m for m in sys.modules if m.startswith('sandboxer.dev')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "[]"


def test_only_settings_read_the_environment() -> None:
    readers = []
    for package in ("schemas", "adapters", "consumers", "sandboxer"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if "os.environ" in path.read_text() or "getenv(" in path.read_text():
                readers.append(str(path.relative_to(ROOT)))
    # The dev providers set Modal's own variables, which its client reads itself.
    assert readers == ["sandboxer/dev/providers.py", "sandboxer/settings.py"]
