"""The system units, deployed as docs/deployment.md says, under systemd as PID 1."""

from __future__ import annotations

import json

from .deploy import (
    CONFIG,
    DEMO_PASSWORD,
    DEMO_USER,
    PROXY_TCP,
    SOCKET,
    SOCKET_UNIT,
    TROUBLE,
    UNIT,
    SystemService,
    run_steps,
)


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


def test_root_logs_in_a_group_member_reads_a_stranger_is_refused(system: SystemService) -> None:
    machine = system.machine
    system.add_user("alice")
    run_steps(machine, "System service", ["5"])  # usermod -aG geins-broker alice
    system.add_user("bob")
    system.login()  # as root
    # alice's primary group is her own: geins-broker is only a supplementary group.
    assert machine.run(["id", "-gn", "alice"]).stdout.strip() == "alice"

    private = system.cli("token", "--profile", "private", user="alice", check=False)
    assert private.returncode == 6, private  # forbidden: no allow_groups on it
    assert "forbidden" in private.stderr

    stranger = system.cli("token", "--socket", SOCKET, user="bob", check=False)
    assert stranger.returncode == 3, stranger  # cannot even reach the socket
    assert "Permission denied" in stranger.stderr
    assert machine.run(["ls", "/var/lib/geins-broker"], user="bob", check=False).returncode != 0


def test_a_supplementary_group_member_reads_a_token(system: SystemService) -> None:
    system.add_user("alice")
    run_steps(system.machine, "System service", ["5"])  # usermod -aG geins-broker alice
    system.login()
    token = system.token()
    read = system.cli("token", user="alice", check=False)
    assert (read.returncode, read.stdout.strip()) == (0, token), read.stderr


def test_watchdog_kills_a_hung_daemon_and_sessions_survive(system: SystemService) -> None:
    machine = system.machine
    # Test-only: a short watchdog, and the fault that lets SIGUSR1 wedge the loop
    # (broker/daemon/fault_injection.py). The rest of the unit is as shipped.
    machine.run(
        "mkdir -p /etc/systemd/system/geins-broker.service.d && "
        "cat > /etc/systemd/system/geins-broker.service.d/test-watchdog.conf",
        input="[Service]\nWatchdogSec=2s\nEnvironment=GEINS_BROKER_TEST_FAULTS=hang-on-sigusr1\n",
    )
    machine.systemctl("daemon-reload")
    system.login()
    token = system.token()
    hung = system.show("MainPID")["MainPID"]

    machine.systemctl("kill", "--kill-who=main", "--signal=SIGUSR1", UNIT)
    machine.wait_until(
        "the watchdog to fire",
        lambda: "Failed with result 'watchdog'" in machine.journal(UNIT),
    )
    journal = machine.journal(UNIT)
    assert "event=test_fault fault=hang-on-sigusr1" in journal
    assert "Watchdog timeout (limit 2s)!" in journal
    assert f"Killing process {hung} (geins-broker) with signal SIGABRT" in journal

    assert system.token() == token  # the next connection is served, by a new process
    shown = system.show("MainPID", "NRestarts", "ActiveState")
    assert shown["MainPID"] not in ("0", hung)
    assert shown["ActiveState"] == "active"
    assert f"event=restored profile=default state=active username={DEMO_USER}" in (
        machine.journal(UNIT)
    )


def test_reload_rereads_the_config(system: SystemService) -> None:
    machine = system.machine
    system.login()
    token = system.token()
    before = system.show("MainPID")["MainPID"]
    system.set_config(CONFIG + CONFIG.split("\n\n")[1].replace("private", "added"))
    machine.systemctl("reload", UNIT)

    status = system.cli("status").stdout
    assert "added    logged_out" in status
    assert system.show("MainPID", "ActiveState") == {"MainPID": before, "ActiveState": "active"}
    assert system.token() == token
    assert "event=reloaded profiles=3" in machine.journal(UNIT)

    system.set_config("[broker\n")  # broken: the daemon keeps what it has
    machine.systemctl("reload", UNIT)
    assert "event=reload_failed" in machine.journal(UNIT)
    assert system.show("ActiveState")["ActiveState"] == "active"
    assert system.token() == token


def test_stop_drains_exits_zero_and_systemd_keeps_the_socket(system: SystemService) -> None:
    machine = system.machine
    system.login()
    # A refresh that takes 2 s upstream is in flight when the stop comes.
    system.emulator(
        "POST", "faults", {"kind": "latency", "match": "GET /api/demo_prod/login", "seconds": 2}
    )
    machine.run(
        [
            "systemd-run",
            "--quiet",
            "--unit=slow-refresh",
            "--property=RemainAfterExit=yes",
            "geins-broker",
            "refresh",
        ]
    )
    machine.wait_until(
        "the refresh to reach the emulator",
        lambda: system.emulator("GET", "stats")["in_flight"] >= 1,
        timeout=10,
    )
    machine.systemctl("stop", UNIT)

    assert system.show("Result", "ExecMainStatus", "ActiveState") == {
        "Result": "success",
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }
    journal = machine.journal(UNIT)
    assert "event=stopping in_flight=1 " in journal
    assert "event=shutdown_grace_over" not in journal
    assert machine.show("slow-refresh.service", "ExecMainStatus")["ExecMainStatus"] == "0"
    assert "refreshed profile default" in machine.journal("slow-refresh.service")

    assert machine.show(SOCKET_UNIT, "SubState")["SubState"] == "listening"
    machine.run(["test", "-S", SOCKET])
    assert "default  active" in system.cli("status").stdout  # started again on demand

    machine.systemctl("stop", SOCKET_UNIT)  # stops both, and the socket goes (RemoveOnStop=)
    assert system.show("ActiveState", "ExecMainStatus") == {
        "ActiveState": "inactive",
        "ExecMainStatus": "0",
    }
    assert machine.run(["test", "-e", SOCKET], check=False).returncode == 1


def test_rotation_under_the_hardened_unit_keeps_the_journal_clean(
    system: SystemService,
) -> None:
    """Ten rotations of 3-second bearers: hours of production rotation, compressed."""
    machine = system.machine
    system.start_emulator("--token-ttl", "3")  # strict: a used refresh token is dead
    system.login()
    secrets = {DEMO_PASSWORD}

    def rotated_enough() -> bool:
        state = system.state()
        secrets.update(s for s in (state["token"], state["refresh_token"]) if s)
        secrets.add(system.token())
        return int(state["refreshes"]) >= 10

    machine.wait_until("ten rotations", rotated_enough, timeout=90)
    status = system.cli("status", "--json").stdout
    profile = next(p for p in json.loads(status)["profiles"] if p["profile"] == "default")
    assert (profile["state"], profile["last_error"]) == ("active", None)
    assert system.emulator("GET", "stats")["counts"]["GET /login"] >= 10
    assert len(secrets) >= 20  # every rotation brought a new bearer and refresh token

    unit_journal = machine.journal(UNIT)
    assert unit_journal.count("event=refreshed profile=default") >= 10
    assert [t for t in TROUBLE if t in unit_journal] == []
    everything = machine.run(["journalctl", "--no-pager", "--output=verbose"]).stdout
    assert [s[:8] for s in secrets if s in everything] == []
    assert system.show("NRestarts")["NRestarts"] == "0"


def test_no_system_call_is_refused(system: SystemService) -> None:
    """A refused call kills the daemon (SIGSYS), so one that a library would have
    swallowed shows too. Everything the daemon does in a day: start, login, refresh,
    token, status, a proxied request over loopback TCP (the caller found by sock_diag),
    reload, watch, logout, stop."""
    machine = system.machine
    system.kill_on_refused_system_call()
    # A host name, so the address comes through NSS (getaddrinfo), as in production.
    system.set_config(CONFIG.replace("http://127.0.0.1", "http://localhost"))
    system.start_emulator("--token-ttl", "2")
    system.login()
    machine.wait_until("a rotation", lambda: int(system.state()["refreshes"]) >= 2, timeout=30)
    system.cli("refresh")
    system.cli("status")
    # The proxy on loopback TCP: sock_diag names the caller (root here) by netlink.
    machine.run(
        "curl --fail --silent --show-error -H 'Content-Type: application/json' "
        f"""--data '{{"query":"{{ getUser {{ email }} }}"}}' http://{PROXY_TCP}/graphql"""
    )
    watched = machine.run(["timeout", "4", "geins-broker", "watch"], check=False)
    assert watched.returncode == 124, watched.stderr  # still watching when timed out
    assert watched.stdout.strip(), "watch saw no rotation in 4 s of 2-second tokens"
    machine.systemctl("reload", UNIT)
    system.cli("logout")
    system.login()
    system.token()
    machine.systemctl("stop", UNIT)
    shown = system.show("Result", "ExecMainStatus", "NRestarts")
    assert shown == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}, machine.journal(
        UNIT
    )
    assert [t for t in TROUBLE if t in machine.journal(UNIT)] == []
