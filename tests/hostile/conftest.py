"""Fixtures of the hostile suites."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import EmulatorProcess


@pytest.fixture
def base(short_tmp: Path) -> Path:
    """A root-owned 0755 directory: others may enter it, not write it. Skips where
    this process may not switch uids (CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs as root)")
    short_tmp.chmod(0o755)
    return short_tmp


@pytest.fixture
def emulator_process() -> Iterator[EmulatorProcess]:
    process = EmulatorProcess()
    try:
        yield process
    finally:
        assert process.stop() == 0
