"""Deploying geins-broker into a booted container, by the book.

The shell blocks of docs/deployment.md are the deployment: `doc_blocks()` reads them
from the document and the suite runs them verbatim, in a working directory laid out as
the document assumes (the project's wheel, its systemd/ folder and a config.toml). So a
step that is wrong in the document fails here, and a test cannot quietly do something
an operator is not told to do.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import build_wheel

from .image import REPO, VENV
from .machine import Machine, MachineError

DOC = REPO / "docs" / "deployment.md"
#: Where the bundle (wheel, systemd/, config.toml) appears inside the container.
BUNDLE = "/mnt/bundle"
EMULATOR = "http://127.0.0.1:8080"
SOCKET = "/run/geins-broker/broker.sock"
#: The proxy's listeners: the daemon binds the socket itself, next to SOCKET.
PROXY_SOCKET = "/run/geins-broker/merchant.sock"
PROXY_TCP = "127.0.0.1:8480"
UNIT = "geins-broker.service"
SOCKET_UNIT = "geins-broker.socket"
DEMO_USER, DEMO_PASSWORD = "demo@example.com", "demo-password"

CONFIG = f"""\
[profiles.default]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "{EMULATOR}"
merchant_api_url = "{EMULATOR}"
allow_groups = ["geins-broker"]

[profiles.private]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "{EMULATOR}"
merchant_api_url = "{EMULATOR}"

[broker]
# The proxy's merchant.sock, which the daemon binds itself: 0660 and this group, like
# broker.sock (docs/deployment.md, step 5).
socket_group = "geins-broker"

[proxy]
tcp = "{PROXY_TCP}"
"""

#: What a refused system call or a crash would leave in the unit's journal.
TROUBLE = (
    "Operation not permitted",
    "EPERM",
    "PermissionError",
    "Traceback",
    "level=error",
    "level=warning",
    "SIGSYS",
    "status=31/SYS",
    "core-dump",
    "mode is different",
)


def doc_blocks(section: str) -> dict[str, list[str]]:
    """The ```sh blocks of one `## section` of docs/deployment.md, by numbered step
    ("1", "2", ...; "" for blocks before the first step)."""
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise LookupError(f"no section {section!r} in {DOC}")
    blocks: dict[str, list[str]] = {}
    step = ""
    lines = iter(match.group(1).splitlines())
    for line in lines:
        if numbered := re.match(r"^(\d+)\. \*\*", line):
            step = numbered.group(1)
        elif line.strip() == "```sh":
            indent = line[: len(line) - len(line.lstrip())]
            body = []
            for inner in lines:
                if inner.strip() == "```":
                    break
                body.append(inner.removeprefix(indent))
            blocks.setdefault(step, []).append("\n".join(body) + "\n")
    return blocks


def make_bundle(directory: Path) -> Path:
    """The working directory the document assumes: the wheel, systemd/, config.toml."""
    directory.mkdir(parents=True, exist_ok=True)
    build_wheel(directory)
    shutil.copytree(REPO / "systemd", directory / "systemd")
    (directory / "config.toml").write_text(CONFIG)
    return directory


def run_steps(
    machine: Machine,
    section: str,
    steps: list[str],
    *,
    user: str | None = None,
    cwd: str = BUNDLE,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Run the blocks of these steps, each under `set -e`; their outputs."""
    blocks = doc_blocks(section)
    return [
        machine.run(f"set -e\ncd {shlex.quote(cwd)}\n{block}", user=user, env=env).stdout
        for step in steps
        for block in blocks[step]
    ]


@dataclass
class SystemService:
    """The system service deployed by docs/deployment.md steps 1-4, and the emulator it
    talks to, inside `machine`."""

    machine: Machine
    _emulator_unit: str | None = None
    _emulator_starts: int = 0

    def deploy(self) -> None:
        run_steps(self.machine, "System service", ["1", "2", "3", "4"])
        self.start_emulator()

    # -- the emulator ------------------------------------------------------------------

    def start_emulator(self, *args: str) -> None:
        """The emulator as a transient unit on the container's loopback (restarted, and
        so forgetting every session, if it runs already)."""
        # A stopped transient unit stays loaded (its name taken) until systemd gets round
        # to collecting it, which under load is after our next start: a new name each time.
        if self._emulator_unit is not None:
            self.machine.run(["systemctl", "stop", self._emulator_unit], check=False)
        self._emulator_starts += 1
        self._emulator_unit = f"geins-emulator-{self._emulator_starts}.service"
        self.machine.run(
            [
                "systemd-run",
                "--quiet",
                "--collect",
                f"--unit={self._emulator_unit}",
                "--property=DynamicUser=yes",
                f"{VENV}/bin/geins-broker",
                "emulator",
                "--listen",
                "127.0.0.1:8080",
                *args,
            ]
        )
        self.machine.run([f"{VENV}/bin/python", "-c", _WAIT_FOR_PORT])

    def emulator(self, method: str, action: str, body: dict[str, Any] | None = None) -> Any:
        """The emulator's control API (/_emulator/ACTION)."""
        argv = [f"{VENV}/bin/python", "-c", _CONTROL, method, action, json.dumps(body or {})]
        return json.loads(self.machine.run(argv).stdout)

    # -- the broker --------------------------------------------------------------------

    def cli(
        self, *args: str, user: str | None = None, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`geins-broker ARGS` inside, as root or `user`."""
        return self.machine.run(["geins-broker", *args], user=user, input=input, check=check)

    def login(self, profile: str = "default") -> None:
        self.cli(
            "login",
            "--profile",
            profile,
            "--username",
            DEMO_USER,
            "--password-stdin",
            input=DEMO_PASSWORD + "\n",
        )

    def token(self, profile: str = "default", user: str | None = None) -> str:
        return self.cli("token", "--profile", profile, user=user).stdout.strip()

    def state(self, profile: str = "default") -> dict[str, Any]:
        """The session file the daemon keeps (as root; it holds the refresh token)."""
        path = f"/var/lib/geins-broker/{profile}.session.json"
        return dict(json.loads(self.machine.run(["cat", path]).stdout))

    def show(self, *properties: str) -> dict[str, str]:
        return self.machine.show(UNIT, *properties)

    def add_user(self, name: str, *groups: str) -> None:
        extra = ["--groups", ",".join(groups)] if groups else []
        self.machine.run(["useradd", "--create-home", *extra, name])

    def set_config(self, text: str) -> None:
        self.machine.run(
            "install -m 0640 -o root -g geins-broker /dev/stdin /etc/geins-broker/config.toml",
            input=text,
        )

    def kill_on_refused_system_call(self) -> None:
        """A drop-in that resets SystemCallErrorNumber= (systemd then shows 2**31 - 2, its
        "kill"): a call the filter refuses kills the daemon (SIGSYS) instead of failing
        with EPERM, so one that a library would have swallowed shows too. Everything
        else in the unit stays as shipped."""
        self.machine.run(
            "mkdir -p /etc/systemd/system/geins-broker.service.d && "
            "cat > /etc/systemd/system/geins-broker.service.d/test-seccomp-kill.conf",
            input="[Service]\nSystemCallErrorNumber=\n",
        )
        self.machine.systemctl("daemon-reload")
        assert self.show("SystemCallErrorNumber")["SystemCallErrorNumber"] == str(2**31 - 2)

    def wait_for_state(self, active: str, sub: str | None = None, timeout: float = 30) -> None:
        def reached() -> bool:
            now = self.show("ActiveState", "SubState")
            return now["ActiveState"] == active and sub in (None, now["SubState"])

        try:
            self.machine.wait_until(f"{UNIT} {active}/{sub}", reached, timeout)
        except MachineError as exc:
            raise MachineError(f"{exc}; journal:\n{self.machine.journal(UNIT)}") from None


_WAIT_FOR_PORT = """
import socket, sys, time
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", 8080), timeout=1).close()
        sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit("the emulator is not listening on 127.0.0.1:8080")
"""

_CONTROL = """
import sys, urllib.request
method, action, body = sys.argv[1:]
request = urllib.request.Request(
    "http://127.0.0.1:8080/_emulator/" + action,
    data=None if method == "GET" else body.encode(),
    method=method,
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(request, timeout=10) as response:
    sys.stdout.write(response.read().decode())
"""
