"""The packaged layout at boot: units, sysusers.d and tmpfiles.d under /usr/lib, the
socket enabled, and nothing run by hand. systemd-sysusers and systemd-tmpfiles must
have made the user, the group and the directories before the socket is bound, so that
a member of the group can reach a socket whose service has never run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from .deploy import SOCKET, SOCKET_UNIT, UNIT, SystemService, run_steps
from .machine import Machine


def test_packaged_units_come_up_at_boot(
    boot: Callable[[Mapping[str, Path]], Machine], bundle: Path, tmp_path: Path
) -> None:
    units = bundle / "systemd"
    # What `systemctl enable` (or a package's preset) does, as a drop-in: the links it
    # makes cannot be bind-mounted, and systemd ignores plain files in .wants/.
    enabled = tmp_path / "enabled.conf"
    enabled.write_text("[Unit]\nWants=geins-broker.socket\n")
    machine = boot(
        {
            "/usr/lib/systemd/system/geins-broker.socket": units / "system/geins-broker.socket",
            "/usr/lib/systemd/system/geins-broker.service": units / "system/geins-broker.service",
            "/usr/lib/sysusers.d/geins-broker.conf": units / "sysusers.d/geins-broker.conf",
            "/usr/lib/tmpfiles.d/geins-broker.conf": units / "tmpfiles.d/geins-broker.conf",
            "/etc/systemd/system/sockets.target.d/geins-broker.conf": enabled,
        }
    )

    def stat(path: str, user: str | None = None) -> list[str]:
        return machine.run(["stat", "--format=%A %U %G", path], user=user).stdout.split()

    assert machine.show(SOCKET_UNIT, "SubState")["SubState"] == "listening"
    assert stat("/run/geins-broker") == ["drwxr-x---", "geins-broker", "geins-broker"]
    assert stat("/etc/geins-broker") == ["drwxr-x---", "root", "geins-broker"]
    assert stat(SOCKET) == ["srw-rw----", "geins-broker", "geins-broker"]
    assert system_never_ran(machine)

    # The operator's remaining steps: the program, the config, a client in the group.
    run_steps(machine, "System service", ["1", "3"])
    system = SystemService(machine)
    system.start_emulator()
    machine.run(["useradd", "--create-home", "alice"])
    run_steps(machine, "System service", ["5"])
    assert stat(SOCKET, user="alice")[0] == "srw-rw----"  # reachable before any start
    assert system_never_ran(machine)
    status = system.cli("status", user="alice")  # a group member's connection starts it
    assert "default  logged_out" in status.stdout  # allow_groups = ["geins-broker"]
    assert "private" not in status.stdout
    assert system.show("ActiveState", "User") == {"ActiveState": "active", "User": "geins-broker"}


def system_never_ran(machine: Machine) -> bool:
    return (
        machine.show(UNIT, "ExecMainStartTimestampMonotonic")["ExecMainStartTimestampMonotonic"]
        == "0"
    )
