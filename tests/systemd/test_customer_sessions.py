"""Customer sessions ([apps.NAME], docs/sessions.md) under the hardened system unit.

A storefront's service user, allowed by the app's group and holding it (and the
socket's group) only as supplementary groups, as docs/deployment.md step 6 sets them,
logs a customer in through the socket with the Python client installed beside the
daemon, and uses the handle afterwards on connections of its own. The unit runs with
refused system calls killing it, so SQLite's WAL, its shared-memory file and its
fsyncs in the state directory show whether ProtectSystem=strict and the filter allow
them; the session outlives a restart, so the store was written and reopens there.
"""

from __future__ import annotations

import json
from typing import Any

from .deploy import (
    CONFIG,
    DEMO_PASSWORD,
    DEMO_USER,
    EMULATOR,
    TROUBLE,
    UNIT,
    SystemService,
    run_steps,
)
from .image import VENV

APP = f"""
[apps.shop]
account = "demo"
api_key = "demo-api-key"
auth_service_url = "{EMULATOR}"
merchant_api_url = "{EMULATOR}"
allow_groups = ["shop"]
"""
STATE = "/var/lib/geins-broker"
#: The storefront's side: `login` (password on stdin) creates a session, `use` (handle
#: on stdin) reuses one; both then take the bearer and show it to the Merchant API, as
#: the storefront would. Prints the handle, the bearer and whom the Merchant API says
#: it belongs to, or the broker's error code.
_STOREFRONT = f"""
import json, sys, urllib.request
from geins_broker_client import BrokerError, Client
op, secret = sys.argv[1], sys.stdin.read().strip()
try:
    with Client() as broker:
        if op == "login":
            handle = broker.session_login("shop", {DEMO_USER!r}, secret, remember=True).handle
        else:
            handle = secret
        bearer = broker.session_token("shop", handle, min_valid=30).token
        info = broker.session_info("shop", handle)
except BrokerError as exc:
    print(json.dumps({{"error": exc.code}}))
    sys.exit(0)
request = urllib.request.Request(
    "{EMULATOR}/graphql",
    data=json.dumps({{"query": "{{ getUser {{ email }} }}"}}).encode(),
    headers={{
        "Content-Type": "application/json",
        "X-ApiKey": "demo-api-key",
        "Authorization": "Bearer " + bearer,
    }},
)
with urllib.request.urlopen(request, timeout=10) as response:
    user = json.load(response)["data"]["getUser"]["email"]
print(json.dumps({{"handle": handle, "bearer": bearer, "user": user, "info": info.username}}))
"""


def storefront(system: SystemService, user: str, op: str, secret: str) -> dict[str, Any]:
    result = system.machine.run(
        [f"{VENV}/bin/python", "-c", _STOREFRONT, op], user=user, input=secret
    )
    return dict(json.loads(result.stdout))


def test_an_app_group_member_creates_and_uses_a_customer_session(system: SystemService) -> None:
    machine = system.machine
    system.add_user("storefront")
    system.add_user("mallory", "geins-broker")  # may connect, is not in the app's group
    run_steps(machine, "System service", ["6"])  # groupadd shop; usermod -aG ... storefront
    assert machine.run(["id", "-gn", "storefront"]).stdout.strip() == "storefront"
    system.kill_on_refused_system_call()
    system.set_config(CONFIG + APP)  # the first connection starts the daemon with it

    created = storefront(system, "storefront", "login", DEMO_PASSWORD)
    assert (created.get("user"), created.get("info")) == (DEMO_USER, DEMO_USER), created
    handle = created["handle"]
    used = storefront(system, "storefront", "use", handle)  # a new connection: the handle only
    assert (used["user"], used["bearer"]) == (DEMO_USER, created["bearer"])

    # In the socket's group but not the app's: refused before any handle is looked at.
    assert storefront(system, "mallory", "login", DEMO_PASSWORD) == {"error": "forbidden"}
    assert storefront(system, "mallory", "use", handle) == {"error": "forbidden"}

    listed = json.loads(system.cli("sessions", "shop", "--json").stdout)["sessions"]
    assert [s["username"] for s in listed] == [DEMO_USER]

    # WAL mode: the store's header says so (bytes 18-19), and the -wal and -shm files sit
    # beside it, all the daemon's alone.
    files = machine.run(f"stat --format='%n %A %U %G' {STATE}/customers.sqlite*").stdout
    assert sorted(files.splitlines()) == [
        f"{STATE}/customers.sqlite{suffix} -rw------- geins-broker geins-broker"
        for suffix in ("", "-shm", "-wal")
    ]
    header = machine.run(["od", "-An", "-tu1", "-j18", "-N2", f"{STATE}/customers.sqlite"])
    assert header.stdout.split() == ["2", "2"]

    machine.systemctl("restart", UNIT)
    restored = storefront(system, "storefront", "use", handle)
    assert restored["user"] == DEMO_USER, restored

    machine.systemctl("stop", UNIT)
    shown = system.show("Result", "ExecMainStatus", "NRestarts")
    journal = machine.journal(UNIT)
    assert shown == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}, journal
    assert "event=customer_session_created" in journal
    assert [t for t in TROUBLE if t in journal] == []
    everything = machine.run(["journalctl", "--no-pager", "--output=verbose"]).stdout
    secrets = {handle, created["bearer"], restored["bearer"], DEMO_PASSWORD}
    assert [s[:8] for s in secrets if s in everything] == []
