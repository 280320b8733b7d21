"""Checks for the systemd units in systemd/ (see docs/deployment.md).

These tests need systemd's command-line tools (systemd-analyze, systemd-sysusers,
systemd-tmpfiles) but no running systemd. They fail, rather than skip, when the
tools are missing: CI images are expected to have them.

`systemd-analyze verify` refuses units whose ExecStart= binary does not exist.
For the system units we therefore verify the *unmodified* unit files inside a
throwaway --root that holds a copy of the host's vendor units (for
sysinit.target and friends) plus stub executables. `--root` is not supported
together with `--user`, so the user units are verified from a temporary copy in
which only the path /usr/bin/geins-broker is replaced by a stub.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SYSTEM = UNITS / "system"
USER = UNITS / "user"
SYSUSERS = UNITS / "sysusers.d" / "geins-broker.conf"
TMPFILES = UNITS / "tmpfiles.d" / "geins-broker.conf"

BROKER_BIN = "/usr/bin/geins-broker"
NAME = "geins-broker"

# Ceiling for `systemd-analyze security --offline=true` (lower is better).
# Measured with systemd 252: system service 1.3 (1.2 before AF_NETLINK, which the
# proxy's TCP listener needs for sock_diag), user service 6.2 (the
# analyser scores user units as if they ran as root with full capabilities).
SYSTEM_EXPOSURE_MAX = 1.5
USER_EXPOSURE_MAX = 6.2

# Where the host keeps its vendor system units (sysinit.target, ...).
HOST_SYSTEM_UNIT_DIRS = ("/usr/lib/systemd/system", "/lib/systemd/system")

EXEC_KEYS = (
    "ExecStartPre",
    "ExecStart",
    "ExecStartPost",
    "ExecReload",
    "ExecStop",
    "ExecStopPost",
    "ExecCondition",
)


# --------------------------------------------------------------------------
# helpers


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        pytest.fail(
            f"{name} not found on PATH: install systemd's command-line tools "
            "(Debian/Ubuntu: package 'systemd') to run the unit-file checks",
            pytrace=False,
        )
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_COLORS="0", SYSTEMD_PAGER="", LC_ALL="C.UTF-8")
    env.update(extra)
    return env


def _run(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, env=env or _env(), timeout=120, check=False
    )


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Minimal systemd unit parser: section -> key -> list of assigned values.

    An empty assignment resets the list, as it does for systemd's list settings.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: assignment outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not an assignment: {raw!r}"
        key, value = key.strip(), value.strip()
        if value == "":
            current[key] = []
        else:
            current.setdefault(key, []).append(value)
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key, [])
    assert len(values) == 1, f"[{section}] {key}= should be set exactly once, got {values}"
    return values[0]


def exec_paths(unit: dict[str, dict[str, list[str]]]) -> set[str]:
    paths = set()
    for key in EXEC_KEYS:
        for value in unit.get("Service", {}).get(key, []):
            argv0 = shlex.split(value)[0].lstrip("@-:+!|")
            assert argv0.startswith("/"), f"{key}={value}: use an absolute path"
            paths.add(argv0)
    return paths


def _write_stub(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


def _exposure(output: str) -> float:
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", output)
    assert m, f"could not find the overall exposure level in:\n{output}"
    return float(m.group(1))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can get long.
    d = Path(tempfile.mkdtemp(prefix="gb-units-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _user_env(base: Path) -> dict[str, str]:
    home, runtime = base / "home", base / "run"
    for d in (home, runtime):
        d.mkdir(mode=0o700, exist_ok=True)
    return _env(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(runtime),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        XDG_CACHE_HOME=str(home / ".cache"),
    )


SYSTEM_SERVICE = parse_unit(SYSTEM / f"{NAME}.service")
SYSTEM_SOCKET = parse_unit(SYSTEM / f"{NAME}.socket")
USER_SERVICE = parse_unit(USER / f"{NAME}.service")
USER_SOCKET = parse_unit(USER / f"{NAME}.socket")


# --------------------------------------------------------------------------
# systemd-analyze verify


def test_system_units_verify_clean(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    root = tmp_path / "root"
    host_dirs = [d for d in HOST_SYSTEM_UNIT_DIRS if Path(d, "sysinit.target").is_file()]
    assert host_dirs, f"no vendor system units (sysinit.target) in {HOST_SYSTEM_UNIT_DIRS}"
    for d in host_dirs:
        if not (root / d.lstrip("/")).exists():
            shutil.copytree(d, root / d.lstrip("/"), symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in (f"{NAME}.socket", f"{NAME}.service"):
        shutil.copy(SYSTEM / unit, etc / unit)
    for path in exec_paths(SYSTEM_SERVICE):
        if path != BROKER_BIN:
            assert os.access(path, os.X_OK), f"{path} (used by the service) missing on this host"
        _write_stub(root / path.lstrip("/"))

    r = _run([analyze, "verify", f"--root={root}", f"{NAME}.socket", f"{NAME}.service"])
    out = (r.stdout + r.stderr).strip()
    assert (r.returncode, out) == (0, ""), f"verify failed (rc={r.returncode}):\n{out}"


def test_user_units_verify_clean(short_tmp: Path) -> None:
    analyze = _tool("systemd-analyze")
    stub = short_tmp / "bin" / "geins-broker"
    _write_stub(stub)
    units = short_tmp / "units"
    units.mkdir()
    for unit in (f"{NAME}.socket", f"{NAME}.service"):
        text = (USER / unit).read_text()
        (units / unit).write_text(text.replace(BROKER_BIN, str(stub)))
    for path in exec_paths(USER_SERVICE) - {BROKER_BIN}:
        assert os.access(path, os.X_OK), f"{path} (used by the user service) missing on this host"

    r = _run(
        [
            analyze,
            "--user",
            "verify",
            str(units / f"{NAME}.socket"),
            str(units / f"{NAME}.service"),
        ],
        env=_user_env(short_tmp),
    )
    out = (r.stdout + r.stderr).strip()
    assert (r.returncode, out) == (0, ""), f"verify --user failed (rc={r.returncode}):\n{out}"


# --------------------------------------------------------------------------
# systemd-analyze security


def test_system_service_exposure() -> None:
    analyze = _tool("systemd-analyze")
    r = _run([analyze, "security", "--offline=true", str(SYSTEM / f"{NAME}.service")])
    assert r.returncode == 0, r.stdout + r.stderr
    score = _exposure(r.stdout)
    assert score <= SYSTEM_EXPOSURE_MAX, (
        f"exposure {score} > {SYSTEM_EXPOSURE_MAX}; a sandboxing option was lost:\n{r.stdout}"
    )


def test_user_service_exposure(short_tmp: Path) -> None:
    analyze = _tool("systemd-analyze")
    r = _run(
        [analyze, "--user", "security", "--offline=true", str(USER / f"{NAME}.service")],
        env=_user_env(short_tmp),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    score = _exposure(r.stdout)
    assert score <= USER_EXPOSURE_MAX, f"user exposure {score} > {USER_EXPOSURE_MAX}:\n{r.stdout}"


# --------------------------------------------------------------------------
# the documented design


def test_system_socket_design() -> None:
    s = SYSTEM_SOCKET
    assert one(s, "Socket", "ListenStream") == "/run/geins-broker/broker.sock"
    assert one(s, "Socket", "SocketMode") == "0660"
    assert one(s, "Socket", "SocketUser") == NAME
    assert one(s, "Socket", "SocketGroup") == NAME
    assert one(s, "Socket", "DirectoryMode") == "0750"
    assert s["Socket"].get("Accept", ["no"]) == ["no"]
    assert one(s, "Install", "WantedBy") == "sockets.target"


def test_user_socket_design() -> None:
    s = USER_SOCKET
    assert one(s, "Socket", "ListenStream") == "%t/geins-broker/broker.sock"
    assert one(s, "Socket", "SocketMode") == "0600"
    assert one(s, "Socket", "DirectoryMode") == "0700"
    assert "SocketGroup" not in s["Socket"]
    assert "SocketUser" not in s["Socket"]
    assert s["Socket"].get("Accept", ["no"]) == ["no"]
    assert one(s, "Install", "WantedBy") == "sockets.target"


@pytest.mark.parametrize("unit", [SYSTEM_SERVICE, USER_SERVICE], ids=["system", "user"])
def test_service_lifecycle(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "WatchdogSec") == "30s"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert "TimeoutStopSec" in unit["Service"]
    start = shlex.split(one(unit, "Service", "ExecStart"))
    assert start[:2] == [BROKER_BIN, "serve"]
    assert start[2:] == ["--config", "%E/geins-broker/config.toml"]
    assert shlex.split(one(unit, "Service", "ExecReload"))[-2:] == ["-HUP", "$MAINPID"]
    assert f"{NAME}.socket" in one(unit, "Unit", "Requires").split()
    assert f"{NAME}.socket" in " ".join(unit["Unit"]["After"]).split()
    assert one(unit, "Install", "Also") == f"{NAME}.socket"
    # The socket lives in the runtime directory: removing the directory when the
    # service stops would delete the inode geins-broker.socket listens on.
    assert one(unit, "Service", "RuntimeDirectory") == NAME
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, "Service", "StateDirectory") == NAME
    assert one(unit, "Service", "StateDirectoryMode") == "0700"
    assert one(unit, "Service", "ConfigurationDirectory") == NAME
    assert one(unit, "Service", "UMask") == "0077"
    families = set(one(unit, "Service", "RestrictAddressFamilies").split())
    # AF_NETLINK for sock_diag: the proxy's TCP listener finds its caller's uid with it
    # (ProcSubset=pid hides /proc/net in the system unit).
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    assert one(unit, "Service", "MemoryDenyWriteExecute") == "yes"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"


def test_system_service_identity_and_sandbox() -> None:
    svc = SYSTEM_SERVICE["Service"]
    assert one(SYSTEM_SERVICE, "Service", "User") == NAME
    assert one(SYSTEM_SERVICE, "Service", "Group") == NAME
    assert "DynamicUser" not in svc
    assert one(SYSTEM_SERVICE, "Service", "RuntimeDirectoryMode") == "0750"
    assert svc["CapabilityBoundingSet"] == []
    assert svc["AmbientCapabilities"] == []
    assert one(SYSTEM_SERVICE, "Service", "ProtectSystem") == "strict"
    # PrivateUsers=yes would map every client uid except root and the service's
    # own to 65534 in SO_PEERCRED, so the broker could no longer tell its
    # clients apart (checked with a real systemd 252). Keep it off.
    assert svc.get("PrivateUsers", ["no"]) == ["no"]


def test_sysusers_matches_units(short_tmp: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    lines = [
        shlex.split(line)
        for line in SYSUSERS.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert [(f[0], f[1]) for f in lines] == [("u", NAME)]  # 'u' also creates the group

    root = short_tmp / "root"
    (root / "etc").mkdir(parents=True)
    r = _run([sysusers, f"--root={root}", str(SYSUSERS)])
    assert r.returncode == 0, r.stdout + r.stderr
    passwd = (root / "etc/passwd").read_text()
    group = (root / "etc/group").read_text()
    assert re.search(rf"^{NAME}:x:\d+:\d+:", passwd, re.M), passwd
    assert re.search(rf"^{NAME}:x:\d+:", group, re.M), group


def test_tmpfiles_matches_units(short_tmp: Path) -> None:
    sysusers, tmpfiles = _tool("systemd-sysusers"), _tool("systemd-tmpfiles")
    entries = {
        f[1]: f
        for f in (
            line.split()
            for line in TMPFILES.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
    }
    run_dir = entries["/run/geins-broker"]
    assert run_dir[0] == "d"
    assert run_dir[2] == one(SYSTEM_SERVICE, "Service", "RuntimeDirectoryMode")
    assert run_dir[2] == one(SYSTEM_SOCKET, "Socket", "DirectoryMode")
    assert run_dir[3:5] == [NAME, NAME]
    assert Path(run_dir[1]) == Path(one(SYSTEM_SOCKET, "Socket", "ListenStream")).parent
    conf_dir = entries["/etc/geins-broker"]
    assert conf_dir[:5] == ["d", "/etc/geins-broker", "0750", "root", NAME]
    assert conf_dir[2] == one(SYSTEM_SERVICE, "Service", "ConfigurationDirectoryMode")

    root = short_tmp / "root"
    (root / "etc").mkdir(parents=True)
    assert _run([sysusers, f"--root={root}", str(SYSUSERS)]).returncode == 0
    r = _run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)])
    problems = [
        line
        for line in (r.stdout + r.stderr).splitlines()
        # Unprivileged test runs cannot chown; everything else must be clean.
        if not (os.geteuid() != 0 and "Operation not permitted" in line and "chown" in line)
    ]
    assert problems == [], "\n".join(problems)
    if os.geteuid() == 0:
        assert r.returncode == 0
    for path in ("run/geins-broker", "etc/geins-broker"):
        assert (root / path).stat().st_mode & 0o7777 == 0o750, path
