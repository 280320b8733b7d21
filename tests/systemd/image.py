"""The Debian root the systemd suite boots: built once with mmdebstrap, then cached.

The cache lives outside the checkout (`$GEINS_BROKER_TEST_CACHE`, default
/var/cache/geins-broker-tests), one directory per key
(KEY/root, and KEY/pins.txt once the build has completed). The key hashes everything the
root is made of: this file (the recipe and its package list), the host's apt sources and
the exact versions of the project's runtime dependencies in the test venv. A change to
any of them builds a new root; the project itself is not part of it, since it is
installed afresh into every booted container (see deploy.py).

What is in the root: systemd as PID 1 with dbus, libnss-systemd and libpam-systemd
(user managers), Python 3.11 with venv, curl (the proxy's own examples use it), and /opt/geins-broker, a venv holding the
project's runtime dependencies (from wheels downloaded on the host, as the container has
no network), so that deploying the project's own wheel into it needs no network either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("GEINS_BROKER_TEST_CACHE", "/var/cache/geins-broker-tests"))
#: Roots kept in the cache besides the current one (older keys are removed).
KEEP = 2

SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "libnss-systemd",
    "libpam-systemd",
    "python3",
    "python3-venv",
    "passwd",
    "procps",
    "netbase",
    # The proxy scenarios call it as docs/proxy.md does (curl --unix-socket).
    "curl",
)
#: What an installed Debian has and mmdebstrap does not write: without it "localhost"
#: does not resolve.
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
#: The venv the units' /usr/bin/geins-broker points into (docs/deployment.md, step 1).
VENV = "/opt/geins-broker"
#: The container's Python, for the markers of the dependencies and their wheels' tags.
PYTHON = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "platform_machine": "x86_64",
    "extra": "",
}
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
#: The container's C library (bookworm's glibc 2.36): a compiled dependency's wheel
#: runs there if its manylinux tag asks for this version or an older one.
GLIBC = (2, 36)


class ImageError(Exception):
    """The root could not be built; the message says which step and why."""


def runtime_pins() -> list[str]:
    """`name==version` for every runtime dependency of geins-broker, as installed in the
    test venv: the container runs what the rest of the suite ran."""
    pins: dict[str, str] = {}
    # From pyproject.toml, not the installed metadata: scripts/_venv.sh puts the project
    # on the path without installing it, so there is none (or a stale one).
    with (Path(__file__).resolve().parents[2] / "pyproject.toml").open("rb") as handle:
        project = tomllib.load(handle)["project"]
    todo = [Requirement(r) for r in project["dependencies"]]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate(PYTHON):
            continue
        try:
            name = metadata.distribution(requirement.name).metadata["Name"]
        except metadata.PackageNotFoundError:
            raise ImageError(
                f"{requirement.name} (a dependency) is not installed in the test venv: "
                "run scripts/_venv.sh again"
            ) from None
        if name in pins:
            continue
        pins[name] = metadata.version(name)
        todo += [Requirement(r) for r in metadata.requires(name) or []]
    return sorted(f"{name}=={version}" for name, version in pins.items())


def wheel_platforms() -> list[str]:
    """Every manylinux tag the container runs, newest first. pip takes the --platform
    values as they are (manylinux_2_17 does not imply manylinux_2_5), and a compiled
    dependency may ship a wheel for one glibc only (manylinux_2_28, say), so they are
    all named: any dependency with a wheel the container can run installs."""
    arch = PYTHON["platform_machine"]
    major, newest = GLIBC
    tags = [f"manylinux_{major}_{minor}_{arch}" for minor in range(newest, 4, -1)]
    return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]


def cache_key(pins: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update(SOURCES.read_bytes() if SOURCES.exists() else b"-")
    digest.update("\n".join(pins).encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time, across processes (parallel sessions share the cache)."""
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(step: str, argv: list[str]) -> None:
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise ImageError(f"{step} failed (exit {result.returncode}):\n{tail}")
    print(f"systemd suite: {step}: {time.monotonic() - started:.1f} s", file=sys.stderr)


def ensure_root() -> Path:
    """The cached root for the current inputs, built first if missing."""
    pins = runtime_pins()
    entry = CACHE / cache_key(pins)
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        if not (entry / "pins.txt").exists():
            _build(entry, pins)
        os.utime(entry)
        _prune(keep=entry)
    return entry / "root"


def _build(entry: Path, pins: list[str]) -> None:
    print(f"systemd suite: building {entry} (cold cache)", file=sys.stderr)
    shutil.rmtree(entry, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=CACHE))
    try:
        tree = staging / "root"
        mirror = [str(SOURCES)] if SOURCES.exists() else []
        _run(
            "mmdebstrap",
            [
                "mmdebstrap",
                "--variant=minbase",
                "--mode=root",
                f"--include={','.join(PACKAGES)}",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                SUITE,
                str(tree),
                *mirror,
            ],
        )
        (tree / "etc" / "hosts").write_text(HOSTS)
        wheels = staging / "wheels"
        _run(
            "download the dependencies' wheels",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(wheels),
                "--python-version",
                PYTHON["python_version"],
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                *(f"--platform={platform}" for platform in wheel_platforms()),
                *pins,
            ],
        )
        _run(
            f"venv {VENV} with the dependencies",
            [
                "systemd-nspawn",
                "--quiet",
                "--register=no",
                "--keep-unit",
                "--private-network",
                f"--machine=gb-build-{os.getpid()}",
                f"--directory={tree}",
                f"--bind-ro={wheels}:/mnt/wheels",
                "/usr/bin/env",
                "-i",
                "PATH=/usr/bin:/bin",
                "sh",
                "-c",
                f"python3 -m venv {VENV} && {VENV}/bin/pip install --quiet "
                "--disable-pip-version-check --no-index --find-links /mnt/wheels " + " ".join(pins),
            ],
        )
        shutil.rmtree(wheels)
        (staging / "pins.txt").write_text("\n".join(pins) + "\n")
        staging.rename(entry)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _prune(keep: Path) -> None:
    """Drop all but the KEEP most recently used other roots, and failed builds."""
    entries = sorted(
        (p for p in CACHE.iterdir() if p.is_dir() and p != keep and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    for old in [*entries[: max(0, len(entries) - KEEP)], *CACHE.glob(".build-*")]:
        shutil.rmtree(old, ignore_errors=True)
