"""The system units, deployed as docs/deployment.md says, under systemd as PID 1."""

from __future__ import annotations

from .deploy import SOCKET, SOCKET_UNIT, UNIT, SystemService


def test_socket_activation_ready_and_status(system: SystemService) -> None:
    machine = system.machine
    assert system.show("ActiveState")["ActiveState"] == "inactive"
    assert machine.show(SOCKET_UNIT, "ActiveState", "SubState") == {
        "ActiveState": "active",
        "SubState": "listening",
    }
    listing = machine.run(["stat", "--format=%A %U %G", SOCKET]).stdout.split()
    assert listing == ["srw-rw----", "geins-broker", "geins-broker"]

    status = system.cli("status")  # the first connection starts the service
    assert "default  logged_out" in status.stdout

    shown = system.show("ActiveState", "SubState", "StatusText", "MainPID", "User")
    assert shown["ActiveState"] == "active"
    assert shown["SubState"] == "running"  # Type=notify: only after READY=1
    assert shown["User"] == "geins-broker"
    assert shown["StatusText"].startswith("2 profiles (2 logged_out); ")
    system.login()
    machine.wait_until(
        "STATUS= to follow the login",
        lambda: system.show("StatusText")["StatusText"].startswith(
            "2 profiles (1 active, 1 logged_out); "
        ),
        timeout=10,
    )
    owner = machine.run(["ps", "-o", "user=", "-p", shown["MainPID"]]).stdout.strip()
    assert owner == "geins-broker"
    assert "event=ready" in machine.journal(UNIT)
