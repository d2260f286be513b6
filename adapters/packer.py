"""HashiCorp Packer, run as a child process: `packer build -machine-readable` of a
template's HCL, its output turned into progress lines, and its artifact (a pullable
image reference and its digest) read from the `manifest` post-processor's file.

The contract with a template's HCL (docs/templates.md): it declares `variable
"version"`; it ends with a `manifest` post-processor (default output,
`packer-manifest.json` in the working folder) whose `custom_data.image` is the image
reference; the digest is the build's `artifact_id` when that is a `sha256:` digest, or
else the content of a file named `digest` among the build's artifact files (an
`artifice` post-processor makes one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandboxer.errors import TemplateFailed

#: HCL2 templates and the manifest post-processor's `custom_data` (Packer 1.6).
MIN_VERSION = (1, 6, 0)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_SUMMARY = ("==> Some builds didn't complete", "--> ")


@dataclass(frozen=True, slots=True)
class Artifact:
    """What a build made: the reference every provider pulls (pinned to `digest`)."""

    image: str
    digest: str
    packer_version: str


def packer_binary(name: str, env: Mapping[str, str]) -> str:
    """Where `name` is, or `TemplateFailed` saying how to get it."""
    found = shutil.which(name, path=env.get("PATH"))
    if found is None:
        raise TemplateFailed(
            "packer not found on PATH (install HashiCorp Packer >= "
            f"{'.'.join(map(str, MIN_VERSION))}: `apt-get install packer`, or set "
            "SANDBOXER_PACKER to its path)"
        )
    return found


async def packer_version(binary: str, env: Mapping[str, str]) -> str:
    """Packer's version (`1.6.6`), or `TemplateFailed` if it is older than MIN_VERSION."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        "version",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_child_env(env),
    )
    out, _ = await proc.communicate()
    found = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out.decode(errors="replace"))
    if proc.returncode != 0 or found is None:
        raise TemplateFailed(f"{binary} version: no version in {out[:200]!r}")
    version = tuple(int(part) for part in found.groups())
    if version < MIN_VERSION:
        raise TemplateFailed(
            f"packer {'.'.join(found.groups())} is too old: at least "
            f"{'.'.join(map(str, MIN_VERSION))} is needed (HCL2, manifest custom_data)"
        )
    return ".".join(found.groups())


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    # No update check: a build talks only to what it builds.
    return {**env, "CHECKPOINT_DISABLE": "1"}


def parse_machine_line(line: str) -> tuple[str, list[str]] | None:
    """(type, data fields) of one `-machine-readable` line
    (`timestamp,target,type,data...`), with Packer's escapes undone."""
    parts = line.rstrip("\n").split(",")
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    fields = [
        p.replace("%!(PACKER_COMMA)", ",").replace("\\n", "\n").replace("\\r", "")
        for p in parts[3:]
    ]
    return parts[2], fields


async def build(
    hcl: Path,
    variables: Mapping[str, str],
    workdir: Path,
    progress: Callable[[str], Awaitable[None]],
    *,
    timeout_s: float,
    binary: str = "packer",
    env: Mapping[str, str],
) -> Artifact:
    """Run `packer build` of `hcl` in `workdir` (empty, the build's own), telling each
    line of its UI to `progress`; the artifact it made, or `TemplateFailed` with
    Packer's last errors. A cancelled or timed-out build kills Packer and its
    children. Packer gets `env` (Settings.packer_env: no secret of the worker's)."""
    binary = packer_binary(binary, env)
    version = await packer_version(binary, env)
    # Packer runs under a guard (this module as a program) in a session of its own:
    # when the worker goes away, killed mid-build even, the guard sees its stdin close
    # and kills Packer and every process it started; the redelivered request builds
    # again on another worker.
    command = [sys.executable, "-m", "adapters.packer", binary, "build", "-machine-readable"]
    for name, value in variables.items():
        command += ["-var", f"{name}={value}"]
    command.append(str(hcl))
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.PIPE,
        env={**_child_env(env), "PYTHONPATH": _source_root()},
        start_new_session=True,
    )
    errors: list[str] = []
    try:
        async with asyncio.timeout(timeout_s):
            assert proc.stdout is not None
            async for raw in proc.stdout:
                parsed = parse_machine_line(raw.decode(errors="replace"))
                if parsed is None:
                    continue
                kind, fields = parsed
                if kind == "ui" and len(fields) >= 2:
                    text = ",".join(fields[1:]).strip()
                    # The script's own stderr and the build's error; not the summary
                    # that repeats them.
                    if fields[0] == "error" and not text.startswith(_SUMMARY):
                        errors.append(text)
                    if text:
                        await progress(text)
            code = await proc.wait()
    except TimeoutError:
        raise TemplateFailed(
            f"packer build of {hcl.name} took longer than {timeout_s:.0f} s"
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        if proc.stdin is not None:
            proc.stdin.close()
    if code != 0:
        said = "; ".join(e.replace("\n", " ") for e in errors[-4:])[-900:] or "no error printed"
        raise TemplateFailed(f"packer build of {hcl.name} failed (exit {code}): {said}")
    return _artifact(workdir, version)


def _artifact(workdir: Path, version: str) -> Artifact:
    """The image reference and digest of the last build of the last run, from the
    manifest post-processor's file."""
    manifest = workdir / "packer-manifest.json"
    try:
        data: dict[str, Any] = json.loads(manifest.read_text())
        run = data["last_run_uuid"]
        last = [b for b in data["builds"] if b.get("packer_run_uuid") == run][-1]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        raise TemplateFailed(
            "the build wrote no usable packer-manifest.json: end the HCL with a `manifest` "
            "post-processor (docs/templates.md)"
        ) from None
    image = (last.get("custom_data") or {}).get("image")
    if not isinstance(image, str) or not image:
        raise TemplateFailed("the manifest post-processor has no custom_data.image")
    digest = str(last.get("artifact_id") or "")
    if not _DIGEST.match(digest):
        files = [f.get("name", "") for f in last.get("files") or [] if isinstance(f, dict)]
        named = [f for f in files if Path(f).name == "digest"]
        digest = (workdir / named[0]).read_text().strip() if named else ""
    if not _DIGEST.match(digest):
        raise TemplateFailed(
            f"no sha256 digest in the build's artifact (artifact_id or a `digest` file): "
            f"{digest[:80]!r}"
        )
    pinned = image if "@" in image else f"{image}@{digest}"
    return Artifact(image=pinned, digest=digest, packer_version=version)


def _source_root() -> str:
    """Where `adapters` is imported from, for the guard's interpreter."""
    return str(Path(__file__).resolve().parent.parent)


def _guard(command: list[str]) -> int:
    """Run `command` in this process's group; kill the whole group once stdin closes
    (the worker that started the build is gone)."""

    def watch() -> None:
        while os.read(0, 4096):  # b"" at EOF
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
    return subprocess.call(command, stdin=subprocess.DEVNULL)


if __name__ == "__main__":
    code = _guard(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # at once: the watching thread is still reading stdin
