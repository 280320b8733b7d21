"""Fixtures of the systemd suite: a cached Debian root, and per test a container booted
from it with the project deployed as docs/deployment.md says.

Every test here is marked `systemd` (scripts/test --quick leaves them out). Where a
container cannot be booted (not root, no systemd-nspawn or mmdebstrap, the root cannot
be built), the tests are skipped with the reason, and the run's summary says so in
capitals; under CI (CI=true) or GEINS_BROKER_REQUIRE_SYSTEMD=1 they fail instead, since
a CI that cannot boot systemd must not look green.

A new scenario takes `system` (a booted container, the system service deployed and
enabled, the emulator on 127.0.0.1:8080), `machine` (a booted container only) or `boot`
(boots containers with extra read-only files, e.g. a credential or a unit drop-in in
place at boot) and uses the helpers: `run`, `systemctl`, `show`, `journal`, `cli`,
`emulator`, `state`, `set_config`, and deploy.run_steps for the document's steps.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path

import pytest

from .deploy import BUNDLE, SystemService, make_bundle
from .image import ImageError, ensure_root
from .machine import Machine, MachineError

HERE = Path(__file__).resolve().parent
TOOLS = ("systemd-nspawn", "mmdebstrap", "nsenter", "setpriv")
_not_run: list[str] = []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tryfirst: the marker must be on before `-m "not systemd"` deselects.
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.systemd)


def pytest_unconfigure(config: pytest.Config) -> None:
    # After pytest's closing line, so it is the last thing a reader of the log sees.
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if _not_run and reporter is not None:
        reporter.write_sep("!", "SYSTEMD SUITE NOT RUN", red=True, bold=True)
        reporter.write_line(f"The systemd tests did not run: {_not_run[0]}", red=True)
        reporter.write_sep("!", red=True, bold=True)


def _cannot_boot(reason: str) -> None:
    _not_run.append(reason)
    if os.environ.get("CI") == "true" or os.environ.get("GEINS_BROKER_REQUIRE_SYSTEMD") == "1":
        pytest.fail(f"cannot boot a systemd container: {reason}", pytrace=False)
    pytest.skip(f"SYSTEMD SUITE NOT RUN: {reason}")


@pytest.fixture(scope="session")
def systemd_root() -> Path:
    """The cached root (built on first use), or a loud skip saying why there is none."""
    if _not_run:
        _cannot_boot(_not_run[0])
    if os.geteuid() != 0:
        _cannot_boot("systemd-nspawn needs root (run scripts/test as root)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        _cannot_boot(
            f"{', '.join(missing)} missing (scripts/test installs systemd-container and "
            "mmdebstrap with apt-get when it runs as root)"
        )
    try:
        return ensure_root()
    except ImageError as exc:
        _cannot_boot(f"building the Debian root failed: {exc}")
        raise  # unreachable: _cannot_boot raises


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="geins-broker-systemd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def bundle(workdir: Path) -> Path:
    return make_bundle(workdir / "bundle")


@pytest.fixture
def boot(
    systemd_root: Path, bundle: Path, workdir: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[Mapping[str, Path]], Machine]]:
    """Boots containers for this test: a tmpfs overlay on the cached root, the bundle
    at /mnt/bundle, and `binds` (path inside: host path, read-only). Stopped after the
    test, their journals added to its report if it failed."""
    booted: list[Machine] = []

    def start(binds: Mapping[str, Path]) -> Machine:
        try:
            machine = Machine.boot(systemd_root, workdir, {BUNDLE: bundle, **binds})
        except MachineError as exc:
            if "systemd-nspawn exited" in str(exc) and not _not_run:
                _cannot_boot(f"systemd-nspawn does not boot here: {exc}")
            raise
        booted.append(machine)
        return machine

    yield start
    report = getattr(request.node, "rep_call", None)
    for machine in booted:
        if report is not None and report.failed:
            journal = machine.run(["journalctl", "--no-pager", "-n", "300"], check=False)
            request.node.add_report_section("teardown", f"{machine.name} journal", journal.stdout)
        machine.stop()


@pytest.fixture
def machine(boot: Callable[[Mapping[str, Path]], Machine]) -> Machine:
    """A freshly booted container, nothing deployed."""
    return boot({})


@pytest.fixture
def system(machine: Machine) -> SystemService:
    """A container with the system service deployed and enabled (docs/deployment.md,
    steps 1-4) and the emulator on 127.0.0.1:8080. Nothing has connected yet."""
    service = SystemService(machine)
    service.deploy()
    return service


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
