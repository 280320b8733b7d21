"""The pure layer stays pure: importing it loads nothing that does I/O.

Each module is imported in a fresh interpreter (this one has long loaded everything), and
the test fails naming the module and what it pulled in. docs/architecture.md lists the
layers; this list is its "pure" row.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = (
    "broker.errors",
    "broker.secret",
    "broker.wallclock",
    "broker.session",
    "broker.schemas",
    "broker.geins.protocol",
    "broker.geins.claims",
    "broker.emulator.model",
    "broker.emulator.jwt",
    "broker.emulator.faults",
    "broker.emulator.merchant",
    "broker.emulator.values",
    "broker.proxy.rules",
    "broker.sealing",
    "broker.stats",
    "broker.fleet.rotation",
    "geins_broker_client.protocol",
    "geins_broker_client.health",
)
IO_PACKAGES = (
    "trio",
    "httpx",
    "httpcore",
    "platformdirs",
    "h11",
    "anyio",
    "prometheus_client",
    "coredis",
)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    probe = (
        f"import sys; import {module}; "
        f"print(' '.join(m for m in {IO_PACKAGES!r} if m in sys.modules))"
    )
    # -I: an isolated interpreter (no environment, no user site); the path is ours.
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path[:0] = {sys.path!r}; {probe}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [], f"import {module} loaded {', '.join(out)}"
