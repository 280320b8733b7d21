"""The Merchant API proxy and the metrics under the hardened system unit.

The deployment's config (deploy.CONFIG, written by docs/deployment.md step 3) gives the
proxy's Unix socket the clients' group (`[broker] socket_group`) and adds the loopback
TCP listener (`[proxy] tcp`). Under the unit the daemon binds `merchant.sock` itself in
/run/geins-broker, next to the socket systemd passed it; over TCP it finds the caller's
uid with sock_diag, which needs AF_NETLINK in RestrictAddressFamilies= (ProcSubset=pid
hides the /proc/net/tcp fallback). Callers are curl, as in docs/proxy.md.
"""

from __future__ import annotations

from tests.support import wait_until

from .deploy import (
    CONFIG,
    DEMO_USER,
    PROXY_SOCKET,
    PROXY_TCP,
    TROUBLE,
    UNIT,
    SystemService,
    run_steps,
)

GET_USER = '{"query":"{ getUser { email } }"}'
#: A unit that runs only when the broker can hand out a token (docs/observability.md).
NEEDS_TOKEN = """\
[Service]
Type=oneshot
ExecCondition=/usr/bin/geins-broker status --check --profile default
ExecStart=/bin/touch /run/needs-token.ran
"""


def curl(
    system: SystemService,
    user: str,
    path: str = "/graphql",
    *,
    tcp: bool = False,
    profile: str | None = None,
) -> tuple[int, str]:
    """(HTTP status, body) of one request through the proxy as `user`, or (curl's exit
    code as a negative number, its complaint) when it got no answer."""
    argv = ["curl", "--silent", "--show-error", "--max-time", "20", "--write-out", "\n%{http_code}"]
    if not tcp:
        argv += ["--unix-socket", PROXY_SOCKET]
    if path == "/graphql":
        argv += ["-H", "Content-Type: application/json", "--data", GET_USER]
    if profile is not None:
        argv += ["-H", f"Geins-Broker-Profile: {profile}"]
    argv.append(f"http://{PROXY_TCP if tcp else 'geins'}{path}")
    result = system.machine.run(argv, user=user, check=False)
    if result.returncode != 0:
        return -result.returncode, result.stderr.strip()
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def test_the_proxy_serves_group_members_on_both_listeners(system: SystemService) -> None:
    machine = system.machine
    system.add_user("alice")
    run_steps(machine, "System service", ["5"])  # usermod -aG geins-broker alice
    system.add_user("bob")
    system.login()  # as root; the first connection starts the service

    listing = machine.run(["stat", "--format=%A %U %G", PROXY_SOCKET]).stdout.split()
    assert listing == ["srw-rw----", "geins-broker", "geins-broker"]

    # The Unix socket: a group member reads the user; the file mode keeps others out.
    status, body = curl(system, "alice")
    assert (status, DEMO_USER in body) == (200, True), body
    status, body = curl(system, "alice", profile="private")  # no allow_groups there
    assert (status, '"code":"forbidden"' in body) == (403, True), body
    assert curl(system, "bob")[0] == -7  # curl: couldn't connect (EACCES)

    # Loopback TCP: anyone may connect, so the uid the kernel names decides.
    status, body = curl(system, "alice", tcp=True)
    assert (status, DEMO_USER in body) == (200, True), body
    status, body = curl(system, "bob", tcp=True)
    assert (status, '"code":"forbidden"' in body) == (403, True), body

    uids = {u: machine.run(["id", "-u", u]).stdout.strip() for u in ("alice", "bob")}
    line = "path=/graphql status=200 "

    def with_alices_line() -> str | None:
        journal = machine.journal(UNIT)
        lines = journal.splitlines()
        return journal if any(line in j and f"uid={uids['alice']}" in j for j in lines) else None

    # The access log is written in batches, a moment after the answers.
    journal = wait_until(with_alices_line, 10, "alice's access line in the journal")
    # A stranger (may read no profile) is refused at the door, before any request: no
    # access line, one throttled refusal line (docs/security.md).
    assert "connection_refused listener=proxy-tcp reason=forbidden" in journal, journal
    assert f"uid={uids['bob']}" not in journal, journal
    others = "\n".join(j for j in journal.splitlines() if "event=connection_refused" not in j)
    assert [t for t in TROUBLE if t in others] == []
    assert "peer_lookup_failed" not in journal


def test_metrics_health_and_exec_condition(system: SystemService) -> None:
    machine = system.machine
    system.add_user("prom", "geins-broker")  # may connect, and is named in [metrics]
    system.add_user("alice", "geins-broker")  # may connect, is not
    system.add_user("bob")
    system.set_config(CONFIG + '\n[metrics]\nallow_users = ["prom"]\n')
    system.login()
    system.login("private")

    exposition = system.cli("metrics").stdout
    assert 'geins_broker_info{version="' in exposition
    assert 'geins_broker_session_state{profile="default",state="active"} 1.0' in exposition
    assert 'geins_broker_session_expiry_timestamp_seconds{profile="default"}' in exposition

    for tcp in (False, True):
        status, body = curl(system, "prom", "/metrics", tcp=tcp)
        assert (status, 'geins_broker_info{version="' in body) == (200, True), body
    assert curl(system, "alice", "/metrics")[0] == 403
    assert curl(system, "bob", "/metrics", tcp=True)[0] == 403
    assert curl(system, "prom", "/healthz") == (200, "healthy: 2 profiles active\n")

    checked = system.cli("status", "--check", check=False)
    assert (checked.returncode, checked.stdout) == (0, "healthy: 2 profiles active\n")
    machine.run("cat > /etc/systemd/system/needs-token.service", input=NEEDS_TOKEN)
    machine.systemctl("daemon-reload")
    machine.systemctl("start", "needs-token.service")
    machine.run(["test", "-e", "/run/needs-token.ran"])  # the condition held

    # The emulator forgets every session: the next refresh is rejected, only a person
    # can help now.
    system.start_emulator()
    system.cli("refresh", check=False)
    checked = system.cli("status", "--check", "--profile", "default", check=False)
    assert checked.returncode == 5, checked
    assert checked.stdout.startswith("login required: default"), checked.stdout
    assert curl(system, "prom", "/healthz")[0] == 503
    machine.run(["rm", "/run/needs-token.ran"])
    machine.systemctl("start", "needs-token.service")  # skipped, not failed
    assert machine.run(["test", "-e", "/run/needs-token.ran"], check=False).returncode == 1
    assert machine.show("needs-token.service", "Result")["Result"] == "success"
    assert "Skipped due to 'exec-condition'" in machine.journal("needs-token.service")
    assert 'geins_broker_session_state{profile="default",state="login_required"} 1.0' in (
        system.cli("metrics").stdout
    )
