"""Every `geins-broker` subcommand against a real daemon and emulator.

Most calls run `main(argv)` in-process (fast, and the output is easy to check); the
ones that are about processes (stdin, a terminal prompt, Ctrl-C, exit codes, what gets
imported) run the command for real.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.cli import exits, quick
from broker.cli import main as cli
from geins_broker_client import Client, errors
from tests.cli.support import CliStack, cli_stack
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    GEINS_BROKER,
    DaemonProcess,
    EmulatorProcess,
    loaded_in_fresh_interpreter,
    write_config,
)


@pytest.fixture
def setup(short_tmp: Path) -> Iterator[CliStack]:
    with cli_stack(
        short_tmp,
        ("--token-ttl", "60", "--user", f"{DEMO_USER}:{DEMO_PASSWORD}"),
        profiles=("default", "other"),
    ) as stack:
        yield stack


def login(setup: CliStack, profile: str = "default") -> None:
    result = setup.run(
        "login",
        "--username",
        DEMO_USER,
        "--password-stdin",
        "--profile",
        profile,
        stdin=DEMO_PASSWORD + "\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(
        f"logged in to profile {profile} as {DEMO_USER}; token expires in "
    )


def test_status_before_login(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    assert setup.main("status") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("geins-broker/0.1.0, up ")
    assert table[1].split() == [
        "PROFILE",
        "STATE",
        "USER",
        "EXPIRES",
        "IN",
        "NEXT",
        "REFRESH",
        "LAST",
        "ERROR",
    ]
    assert table[2].split()[:2] == ["default", "logged_out"]


def _token(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> str:
    assert setup.main("token") == 0
    return capsys.readouterr().out


def test_token_bare_and_json(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    login(setup)
    token = _token(setup, capsys)
    assert token.count("\n") == 1 and token.strip().count(".") == 2  # the bare JWT, nothing else
    assert setup.main("token", "--json", "--min-valid", "30") == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["token"] == token.strip() and as_json["profile"] == "default"
    assert as_json["expires_at"] - time.time() > 30


def test_user_as_table_and_json(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    login(setup)
    assert setup.main("user", "--json") == 0
    assert json.loads(capsys.readouterr().out)["username"] == DEMO_USER
    assert setup.main("user") == 0
    assert "customer_type    PERSON" in capsys.readouterr().out


def test_refresh_then_status_json(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    login(setup)
    token = _token(setup, capsys)
    assert setup.main("refresh") == 0
    assert capsys.readouterr().out.startswith("refreshed profile default")
    assert _token(setup, capsys) != token
    assert setup.main("status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    default = next(p for p in status["profiles"] if p["profile"] == "default")
    assert (default["state"], default["refreshes"], default["username"]) == ("active", 1, DEMO_USER)
    assert token.strip() not in json.dumps(status)


def test_passwd(setup: CliStack) -> None:
    login(setup)
    changed = setup.run("passwd", "--password-stdin", stdin=f"{DEMO_PASSWORD}\nn3w-password\n")
    assert changed.returncode == 0, changed.stderr
    assert "changed the password" in changed.stdout


def test_logout(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    login(setup)
    assert setup.main("logout") == 0
    assert capsys.readouterr().out == "logged out of profile default\n"
    assert setup.main("token") == exits.EXIT_NOT_LOGGED_IN
    assert "not logged in" in capsys.readouterr().err


def test_register(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    registered = setup.run(
        "register",
        "-u",
        "new@example.com",
        "--password-stdin",
        "--customer-type",
        "ORGANIZATION",
        stdin="pw\n",
    )
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith(
        "registered and logged in to profile default as new@example.com"
    )
    assert setup.main("user", "--json") == 0
    assert json.loads(capsys.readouterr().out)["username"] == "new@example.com"


def test_error_exit_codes(setup: CliStack, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = setup.run("login", "-u", DEMO_USER, "--password-stdin", stdin="wrong\n")
    assert wrong.returncode == exits.EXIT_INVALID_CREDENTIALS
    assert wrong.stderr.startswith("geins-broker: invalid credentials: ")
    assert "wrong" not in wrong.stderr.removeprefix("geins-broker: invalid credentials: ")
    assert "Traceback" not in wrong.stderr

    assert setup.main("token", "--profile", "nope") == exits.EXIT_UNKNOWN_PROFILE
    setup.emulator.control("POST", "faults", {"kind": "status", "status": 503})
    unavailable = setup.run(
        "login", "-u", DEMO_USER, "--password-stdin", stdin=DEMO_PASSWORD + "\n"
    )
    assert unavailable.returncode == exits.EXIT_UNAVAILABLE
    setup.emulator.control("DELETE", "faults")

    login(setup)
    setup.emulator.control("POST", "revoke", {"username": DEMO_USER})
    assert setup.main("refresh") == exits.EXIT_LOGIN_REQUIRED
    assert setup.main("status") == exits.EXIT_LOGIN_REQUIRED  # status says so too
    assert "login_required" in capsys.readouterr().out
    assert setup.main("status", "--profile", "other") == 0

    no_input = setup.run("login", "--password-stdin")
    assert no_input.returncode == exits.EXIT_USAGE
    assert "--password-stdin needs --username" in no_input.stderr


def test_not_running(tmp_path: Path) -> None:
    result = subprocess.run(
        [*GEINS_BROKER, "token", "--socket", str(tmp_path / "none.sock")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == exits.EXIT_NOT_RUNNING
    assert (
        result.stderr
        == f"geins-broker: not running: no broker is listening at {tmp_path / 'none.sock'} (No such file or directory)\n"
    )


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.Forbidden("uid 1000 may not read profile 'x'"), exits.EXIT_FORBIDDEN),
        (errors.UpstreamError("Geins refused"), exits.EXIT_UPSTREAM_ERROR),
        (errors.ProtocolError("bad"), exits.EXIT_USAGE),
        (errors.InternalError("bug"), exits.EXIT_INTERNAL),
        (errors.UnknownApp("no app 'x' is configured"), exits.EXIT_UNKNOWN_PROFILE),
        (errors.UnknownSession("no such session; log in again"), exits.EXIT_LOGIN_REQUIRED),
        (errors.RateLimited("too many login attempts; retry in 9 s"), exits.EXIT_UNAVAILABLE),
    ],
)
def test_exit_code_per_error_family(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: errors.BrokerError,
    code: int,
) -> None:
    def failing(self: object, *args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(Client, "token", failing)
    assert cli.main(["token", "--socket", "/nowhere"]) == code
    assert (
        capsys.readouterr().err
        == f"geins-broker: {error.code.replace('_', ' ')}: {error.message}\n"
    )


def test_login_prompts_without_echo(setup: CliStack) -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal session running the real command
        argv = [sys.executable, "-m", "broker", "login", "--socket", str(setup.socket)]
        os.execv(sys.executable, argv)  # noqa: S606 - our own command, no shell
    output = b""

    def read_until(marker: bytes) -> None:
        nonlocal output
        deadline = time.monotonic() + 20
        while marker not in output:
            assert time.monotonic() < deadline, output
            output += os.read(fd, 1024)

    read_until(b"Username: ")
    os.write(fd, DEMO_USER.encode() + b"\n")
    read_until(b"Password: ")
    os.write(fd, DEMO_PASSWORD.encode() + b"\n")
    read_until(b"token expires in")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert DEMO_PASSWORD.encode() not in output  # never echoed


def test_watch_prints_rotations_until_interrupted(setup: CliStack, short_tmp: Path) -> None:
    fast = EmulatorProcess("--token-ttl", "2")
    config = write_config(
        short_tmp / "fast.toml", fast.url, short_tmp / "f.sock", short_tmp / "fstate"
    )
    daemon = DaemonProcess(config, short_tmp)
    watcher = subprocess.Popen(
        [*GEINS_BROKER, "watch", "--json", "--socket", str(short_tmp / "f.sock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        assert json.loads(watcher.stdout.readline()) == {"event": "logged_out"}
        subprocess.run(
            [
                *GEINS_BROKER,
                "login",
                "-u",
                DEMO_USER,
                "--password-stdin",
                "--socket",
                str(short_tmp / "f.sock"),
            ],
            input=DEMO_PASSWORD + "\n",
            check=True,
            capture_output=True,
            text=True,
        )
        first = json.loads(watcher.stdout.readline())
        second = json.loads(watcher.stdout.readline())  # about 1.5 s later
        assert first["event"] == second["event"] == "token"
        assert second["token"] != first["token"]
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=10) == 0
    finally:
        watcher.kill()
        if watcher.stdout:
            watcher.stdout.close()
        daemon.stop()
        fast.stop()


#: What `geins-broker token` and `status --check` must not load on their way to the socket.
HEAVY = ("trio", "httpx", "h11", "anyio", "platformdirs", "asyncio", "argparse", "typing", "re")


@pytest.mark.parametrize(
    "argv",
    [
        ["token"],
        ["token", "--json", "--min-valid", "30"],
        ["status", "--check", "--profile=default"],
    ],
)
def test_the_fast_commands_import_only_the_client(setup: CliStack, argv: list[str]) -> None:
    login(setup)
    # json needs re: a price --json pays, not the bare token.
    heavy = tuple(m for m in HEAVY if not (m == "re" and "--json" in argv))
    code = (
        "import contextlib, io\n"
        "from broker.cli.quick import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main({[*argv, '--socket', str(setup.socket)]!r})\n"
        "assert code == 0, code"
    )
    assert loaded_in_fresh_interpreter(code, heavy) == []


def both_ways(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    """`argv` through the fast path and through the full CLI: exit code, stdout, stderr."""
    answers = []
    for entry in (quick.main, cli.main):
        code = entry(list(argv))
        out, err = capsys.readouterr()
        answers.append((code, out, err))
    return answers[0], answers[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["token"],
        ["token", "--json"],
        ["token", "--min-valid=30", "--profile", "default"],
        ["token", "--profile", "other"],
        ["token", "--profile", "nope"],
        ["token", "--min-valid", "1e9"],
        ["status", "--check"],
        ["status", "--check", "--profile", "other"],
        ["status", "--profile=nope", "--check"],
    ],
)
def test_the_fast_path_answers_as_the_full_cli(
    setup: CliStack, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    login(setup)
    assert quick.fast_options([*argv, "--socket", "s"]) is not None
    fast, full = both_ways([*argv, "--socket", str(setup.socket)], capsys)
    assert fast == full


def test_the_fast_path_answers_as_the_full_cli_with_no_daemon(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["token"], ["status", "--check"]):
        fast, full = both_ways([*argv, "--socket", str(short_tmp / "none.sock")], capsys)
        assert fast == full
        assert fast[0] == exits.EXIT_NOT_RUNNING


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["token"], ("token", {})),
        (["token", "--json", "--profile=a"], ("token", {"--json": True, "--profile": "a"})),
        (
            ["token", "--min-valid", "0", "--timeout=2.5"],
            ("token", {"--min-valid": "0", "--timeout": "2.5"}),
        ),
        (["status", "--check", "--socket", "/s"], ("status", {"--check": True, "--socket": "/s"})),
        # Everything else is the full CLI's to parse (and to refuse, with argparse's words).
        (["status"], None),
        (["status", "--json"], None),
        (["token", "--help"], None),
        (["token", "-h"], None),
        (["token", "--prof", "a"], None),  # argparse's abbreviations
        (["token", "--min-valid", "-1"], None),
        (["token", "--min-valid", "soon"], None),
        (["token", "--timeout"], None),
        (["token", "--json=yes"], None),
        (["token", "--json", "--json"], None),
        (["token", "extra"], None),
        (["user"], None),
        ([], None),
    ],
)
def test_what_the_fast_path_reads(argv: list[str], expected: object) -> None:
    assert quick.fast_options(argv) == expected


def test_completion_script() -> None:
    result = subprocess.run(
        [*GEINS_BROKER, "completion", "bash"], capture_output=True, text=True, check=True
    )
    check = subprocess.run(
        [
            "bash",
            "-c",
            result.stdout + "\nCOMP_WORDS=(geins-broker tok); COMP_CWORD=1; _geins_broker; "
            "echo ${COMPREPLY[@]}; COMP_WORDS=(geins-broker token --min); COMP_CWORD=2; _geins_broker; echo ${COMPREPLY[@]}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.split("\n")[:2] == ["token", "--min-valid"]


def test_help_and_version() -> None:
    result = subprocess.run([*GEINS_BROKER, "--help"], capture_output=True, text=True, check=True)
    for command in ("status", "login", "token", "watch", "serve", "emulator", "passwd", "register"):
        assert command in result.stdout
    assert "exit codes" in result.stdout
    version = subprocess.run(
        [*GEINS_BROKER, "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout == "geins-broker 0.1.0\n"


def test_the_readme_lists_every_exit_code_as_the_cli_does() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for code, meaning in exits.EXIT_MEANINGS.items():
        assert f"| {code} | {meaning} |" in readme
    assert "exit codes: 0 ok, 1 internal error" in cli._EPILOG


def test_sessions_list_and_end_a_customer_everywhere(
    short_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with cli_stack(short_tmp, apps={"shop": {}}) as setup:
        with Client(setup.socket) as client:
            for _ in range(2):
                client.session_login("shop", DEMO_USER, DEMO_PASSWORD)
            client.session_register("shop", "new\x1b[2J@example.com", "pw-1234")
        assert setup.main("sessions", "shop") == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["SESSION", "USER", "CREATED", "LAST", "USED", "ENDS", "IN"]
        assert len(table) == 4
        assert "\x1b" not in "".join(table)  # a customer's username, escaped
        assert setup.main("sessions", "shop", "--username", DEMO_USER, "--json") == 0
        listed = json.loads(capsys.readouterr().out)
        assert [s["username"] for s in listed["sessions"]] == [DEMO_USER, DEMO_USER]
        assert setup.main("sessions", "shop", "--end", DEMO_USER) == 0
        assert capsys.readouterr().out == f"ended 2 session(s) of {DEMO_USER} in app shop\n"
        assert setup.main("sessions", "shop", "--json") == 0
        assert len(json.loads(capsys.readouterr().out)["sessions"]) == 1
        assert setup.main("status") == 0
        assert capsys.readouterr().out.splitlines()[-2:] == [
            "APP   SESSIONS  IN MEMORY",
            "shop  1         1",
        ]
        assert setup.main("status", "--check") != 0  # no profile logged in: as before
        capsys.readouterr()
        assert setup.main("sessions", "nowhere") == exits.EXIT_UNKNOWN_PROFILE
        assert "unknown app" in capsys.readouterr().err
