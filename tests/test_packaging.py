"""The wheel holds every package of the tree, and the C hot path where it can be built.

An installed daemon imports only what the wheel carries: a package missing from it
passes every test run from the checkout and fails at the first import in production
(tests/systemd installs the wheel, but runs only as root with systemd-nspawn).
"""

from __future__ import annotations

import shutil
import sysconfig
import zipfile
from pathlib import Path

import pytest

from broker.rpc import fastpath
from tests.support import REPO, build_wheel

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
    with zipfile.ZipFile(build_wheel(tmp_path)) as archive:
        names = archive.namelist()
        (launcher,) = (n for n in names if n.endswith(".data/scripts/geins-broker"))
        script = archive.read(launcher).decode()
    in_wheel = {
        n.removesuffix("/__init__.py").replace("/", ".")
        for n in names
        if n.endswith("/__init__.py")
    }
    assert sorted(packages_on_disk() - in_wheel) == []
    assert {"broker/py.typed", "geins_broker_client/py.typed"} <= set(names)
    # The command's own launcher (pip points `#!python` at the environment's interpreter),
    # which imports nothing but sys before the CLI's fast path.
    assert script.startswith("#!python\n")
    assert "from broker.cli.quick import main" in script
    assert "import re" not in script
    # The C hot path is built into the wheel wherever it can be (it is optional: without
    # a compiler the wheel is pure, and the daemon serves in Python).
    if shutil.which("cc") and (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        assert [n for n in names if n.startswith("broker/rpc/_fastpath.")], names


def test_the_c_hot_path_is_built_where_a_compiler_is() -> None:
    """Where there is a C compiler and Python's headers (CI), the in-place build of
    scripts/_venv.sh must not have failed quietly: the pure reactor would then be all
    that the suite tested."""
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if shutil.which("cc") is None or not headers.exists():
        pytest.skip(f"no C compiler or no {headers}: the C hot path cannot be built here")
    assert fastpath.built() is None
