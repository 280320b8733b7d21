"""The wheel holds every package of the tree.

An installed daemon imports only what the wheel carries: a package missing from it
passes every test run from the checkout and fails at the first import in production
(tests/systemd installs the wheel, but runs only as root with systemd-nspawn). The
wheel is built from a copy of the sources, so no build/ directory of the checkout's
can add or hide a module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.support import REPO

#: Where each top-level package lives in the checkout.
SOURCES = {
    "broker": REPO / "broker",
    "geins_broker_client": REPO / "clients/python/geins_broker_client",
}


def packages_on_disk() -> set[str]:
    found = set()
    for top, folder in SOURCES.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join((top, *init.parent.relative_to(folder).parts)))
    return found


def test_the_wheel_holds_every_package(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "broker", source / "broker", ignore=ignore)
    shutil.copytree(REPO / "clients/python", source / "clients/python", ignore=ignore)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(tmp_path / "wheel"),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("geins_broker-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    in_wheel = {
        n.removesuffix("/__init__.py").replace("/", ".")
        for n in names
        if n.endswith("/__init__.py")
    }
    assert sorted(packages_on_disk() - in_wheel) == []
    assert {"broker/py.typed", "geins_broker_client/py.typed"} <= set(names)
    assert "geins-broker = broker.cli.quick:main" in scripts
