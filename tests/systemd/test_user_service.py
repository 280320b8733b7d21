"""The user units under `systemctl --user`, for a user with lingering enabled (so their
manager runs without a login session), deployed as docs/deployment.md says."""

from __future__ import annotations

import json

from .deploy import DEMO_USER, EMULATOR, TROUBLE, SystemService, run_steps
from .machine import Machine

USER_ENV = {"XDG_RUNTIME_DIR": "/run/user/1000"}
USER_CONFIG = f"""\
[profiles.default]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "{EMULATOR}"
merchant_api_url = "{EMULATOR}"
"""


def test_user_unit_for_a_lingering_user(machine: Machine) -> None:
    run_steps(machine, "System service", ["1"])  # the program, at /usr/bin/geins-broker
    SystemService(machine).start_emulator()
    machine.run(["useradd", "--create-home", "--uid=1000", "alice"])
    machine.run(["loginctl", "enable-linger", "alice"])
    machine.wait_until(
        "alice's user manager",
        lambda: machine.show("user@1000.service", "ActiveState")["ActiveState"] == "active",
    )
    # The operator's working directory: the project's systemd/ folder and a config.
    machine.run("mkdir ~/kit && cp -r /mnt/bundle/systemd ~/kit/", user="alice")
    machine.run("cat > ~/kit/config.toml", user="alice", input=USER_CONFIG)

    run_steps(machine, "User service", [""], user="alice", cwd="/home/alice/kit", env=USER_ENV)

    def user(*argv: str) -> str:
        return machine.run(list(argv), user="alice", env=USER_ENV).stdout

    shown = machine.show(
        "geins-broker.service",
        "ActiveState",
        "SubState",
        "MainPID",
        "StatusText",
        user="alice",
        env=USER_ENV,
    )
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    assert shown["StatusText"] == "1 profile (1 logged_out); 0 connections"
    assert user("ps", "-o", "user=", "-p", shown["MainPID"]).strip() == "alice"
    socket = "/run/user/1000/geins-broker/broker.sock"
    assert user("stat", "--format=%A %U", socket).split() == ["srw-------", "alice"]

    machine.run(
        ["geins-broker", "login", "--username", DEMO_USER, "--password-stdin"],
        user="alice",
        env=USER_ENV,
        input="demo-password\n",
    )
    token = user("geins-broker", "token").strip()
    assert token.count(".") == 2
    # systemd 252 puts StateDirectory= of a user unit in ~/.config (docs/deployment.md).
    state = json.loads(user("cat", "/home/alice/.config/geins-broker/default.session.json"))
    assert state["token"] == token

    journal = user(
        "journalctl", "--user", "--no-pager", "--output=cat", "--user-unit=geins-broker.service"
    )
    assert "event=login profile=default" in journal
    assert [t for t in TROUBLE if t in journal] == []
