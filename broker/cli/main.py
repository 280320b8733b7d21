"""The `geins-broker` command.

Client subcommands (status, login, token, ...) import only the thin client library, so
`curl -H "Authorization: Bearer $(geins-broker token)"` pays for a socket round trip and
little else. `serve`, `emulator` and `demo` import the daemon's machinery when chosen.

Every expected failure is one line on stderr and a distinct exit code (see EXIT_CODES);
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from broker import __version__
from broker.cli.exits import (
    EXIT_LOGIN_REQUIRED,
    EXIT_MEANINGS,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    check_health,
    report_broker_error,
)
from broker.cli.exits import report as _report
from broker.cli.output import print_token, terminal_safe, token_fields
from geins_broker_client import Client
from geins_broker_client import errors as client_errors

# Not even typing is imported at run time on the way to `geins-broker token`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any

    from geins_broker_client.results import AppStatus, ProfileStatus, Session

    Handler = Callable[[argparse.Namespace], int]
    Options = Callable[[argparse.ArgumentParser], None]

_EPILOG = "exit codes: " + ", ".join(f"{code} {text}" for code, text in EXIT_MEANINGS.items())


class UsageError(Exception):
    """Bad input found after argument parsing (an empty password, a closed stdin)."""


# -- output helpers ------------------------------------------------------------------------


def _iso(when: float | None) -> str:
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _in(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    seconds = round(when - now)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds >= 3600:
        return f"{sign}{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{sign}{seconds // 60}m{seconds % 60:02d}s"
    return f"{sign}{seconds}s"


def _print_json(value: Any) -> None:
    import json

    print(json.dumps(value, separators=(",", ":"), sort_keys=True))


def _session_line(verb: str, session: Session) -> str:
    who = f" as {session.username}" if session.username else ""
    expires = _in(session.expires_at, time.time())
    return terminal_safe(f"{verb} profile {session.profile}{who}; token expires in {expires}")


def _status_table(profiles: Sequence[ProfileStatus], now: float) -> str:
    rows = [("PROFILE", "STATE", "USER", "EXPIRES IN", "NEXT REFRESH", "LAST ERROR")]
    for p in profiles:
        rows.append(
            (
                p.profile,
                p.state,
                p.username or "-",
                _in(p.expires_at, now),
                _in(p.next_refresh_at, now),
                p.last_error or "-",
            )
        )
    safe = [tuple(terminal_safe(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in safe) for i in range(len(safe[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in safe
    )


# -- reading secrets -----------------------------------------------------------------------


def _stdin_lines(count: int) -> list[str]:
    lines = [sys.stdin.readline() for _ in range(count)]
    if any(not line for line in lines):
        raise UsageError(f"expected {count} line(s) on stdin")
    return [line.rstrip("\r\n") for line in lines]


def _prompt(label: str) -> str:
    import getpass

    value = getpass.getpass(f"{label}: ")
    if not value:
        raise UsageError(f"{label.lower()} must not be empty")
    return value


def _new_password() -> str:
    first = _prompt("New password")
    if _prompt("Repeat new password") != first:
        raise UsageError("the new passwords do not match")
    return first


def _username(args: argparse.Namespace) -> str:
    if args.username:
        return str(args.username)
    if args.password_stdin:
        raise UsageError("--password-stdin needs --username")
    value = input("Username: ").strip()
    if not value:
        raise UsageError("username must not be empty")
    return value


# -- subcommands ---------------------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket, timeout=args.timeout)


def _raw_status(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """The parsed status, and each profile's raw table (fleet mode adds to it)."""
    from geins_broker_client import calls

    with _client(args) as client:
        raw = client.call(calls.status(), lambda message: message)
    status = calls.parse_status(raw)
    tables = [p for p in raw.get("profiles", []) if isinstance(p, dict)]
    return status, tables


def cmd_status(args: argparse.Namespace) -> int:
    status, tables = _raw_status(args)
    profiles = [p for p in status.profiles if args.profile in (None, p.profile)]
    if args.check:
        return check_health(profiles, args.profile)
    fleet = {t.get("profile"): t["fleet"] for t in tables if isinstance(t.get("fleet"), dict)}
    if args.json:
        answer: dict[str, Any] = {
            "server": status.server,
            "uptime": status.uptime,
            "profiles": [
                {**p._asdict(), **({"fleet": fleet[p.profile]} if p.profile in fleet else {})}
                for p in profiles
            ],
        }
        if status.apps:
            answer["apps"] = [a._asdict() for a in status.apps]
        _print_json(answer)
    else:
        print(f"{terminal_safe(status.server)}, up {_in(status.uptime, 0)}")
        print(_status_table(profiles, time.time()))
        if status.apps:
            print()
            print(_apps_table(status.apps))
        shown = [t for t in tables if t.get("profile") in {p.profile for p in profiles}]
        if any(t.get("profile") in fleet for t in shown):
            from broker.cli import fleet_report as report

            print()
            print(report.fleet_summary(shown))
            print(report.profile_table(shown))
    return EXIT_LOGIN_REQUIRED if any(p.state == "login_required" for p in profiles) else EXIT_OK


def _apps_table(apps: Sequence[AppStatus]) -> str:
    rows = [("APP", "SESSIONS", "IN MEMORY")]
    rows += [(a.app, str(a.sessions), str(a.in_memory)) for a in apps]
    return _table(rows)


def _table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, every cell escaped for the terminal."""
    safe = [[terminal_safe(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in safe) for i in range(len(safe[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in safe
    )


def cmd_sessions(args: argparse.Namespace) -> int:
    """An app's customer sessions (`--username`: one customer's), or `--end USERNAME`:
    end every session of that customer ("log out everywhere"). Admins only."""
    with _client(args) as client:
        if args.end is not None:
            ended = client.session_end(args.app, args.end)
            if args.json:
                _print_json({"app": args.app, "username": args.end, "ended": ended})
            else:
                print(terminal_safe(f"ended {ended} session(s) of {args.end} in app {args.app}"))
            return EXIT_OK
        listed = client.sessions(args.app, username=args.username)
    if args.json:
        _print_json({"app": args.app, "sessions": [s._asdict() for s in listed]})
        return EXIT_OK
    now = time.time()
    rows = [("SESSION", "USER", "CREATED", "LAST USED", "ENDS IN")]
    rows += [
        (
            s.session,
            s.username or "-",
            _iso(s.created_at),
            _iso(s.last_used_at),
            _in(s.ends_at, now),
        )
        for s in listed
    ]
    print(_table(rows))
    return EXIT_OK


def cmd_cluster(args: argparse.Namespace) -> int:
    from broker.cli import fleet_report as report

    status, tables = _raw_status(args)
    if args.json:
        _print_json(report.cluster_json(status.server, tables))
    else:
        print(report.fleet_summary(tables))
        if report.shared(tables):
            print(report.profile_table(tables))
    if not report.shared(tables):
        return EXIT_USAGE
    healthy = report.cluster_json(status.server, tables)["healthy"]
    return EXIT_OK if healthy else EXIT_UNAVAILABLE


def cmd_metrics(args: argparse.Namespace) -> int:
    with _client(args) as client:
        text = client.metrics()
    sys.stdout.write(terminal_safe(text, keep_newlines=True))
    return EXIT_OK


def cmd_token(args: argparse.Namespace) -> int:
    with _client(args) as client:
        token = client.token(args.profile, min_valid=args.min_valid)
    print_token(token, as_json=args.json)
    return EXIT_OK


def cmd_user(args: argparse.Namespace) -> int:
    with _client(args) as client:
        user = client.user(args.profile)
    fields = user._asdict()
    if args.json:
        _print_json(fields)
    else:
        for name, value in fields.items():
            shown = _iso(value) if name == "expires_at" else terminal_safe(value)
            print(f"{name:16} {shown}")
    return EXIT_OK


def cmd_login(args: argparse.Namespace) -> int:
    username = _username(args)
    password = _stdin_lines(1)[0] if args.password_stdin else _prompt("Password")
    with _client(args) as client:
        session = client.login(username, password, profile=args.profile, remember=args.remember)
    print(_session_line("logged in to", session))
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.logout(args.profile)
    print(f"logged out of profile {args.profile or 'default'}")
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    with _client(args) as client:
        session = client.refresh(args.profile)
    print(_session_line("refreshed", session))
    return EXIT_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    if args.password_stdin:
        current, new = _stdin_lines(2)
    else:
        current, new = _prompt("Current password"), _new_password()
    with _client(args) as client:
        session = client.change_password(current, new, profile=args.profile)
    print(_session_line("changed the password of", session))
    return EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    username = _username(args)
    password = _stdin_lines(1)[0] if args.password_stdin else _new_password()
    user = {"newsletter": args.newsletter, "customerType": args.customer_type}
    with _client(args) as client:
        session = client.register(
            username, password, profile=args.profile, remember=args.remember, user=user
        )
    print(_session_line("registered and logged in to", session))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            for event in client.watch(args.profile):
                if args.json:
                    token = token_fields(event.token) if event.token else {}
                    _print_json({"event": event.event, **token})
                elif event.token is not None:
                    now = time.time()
                    profile = terminal_safe(event.token.profile)
                    print(
                        f"{_iso(now)} token for {profile}: expires "
                        f"{_iso(event.token.expires_at)} (in {_in(event.token.expires_at, now)})",
                        flush=True,
                    )
                else:
                    what = terminal_safe(event.event.replace("_", " "))
                    print(f"{_iso(time.time())} {what}", flush=True)
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from broker.daemon.lifecycle import main as serve_main

    return serve_main(config_path=args.config, socket_path=args.socket)


def cmd_emulator(args: argparse.Namespace) -> int:
    from broker.emulator.run import EmulatorOptions, parse_listen, parse_user
    from broker.emulator.run import main as emulator_main

    try:
        host, port = parse_listen(args.listen)
        users = dict(parse_user(u) for u in args.user) if args.user else None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    names = ("account", "environment", "api_key", "token_ttl", "refresh_ttl", "refresh_grace")
    settings = {name: value for name in names if (value := getattr(args, name)) is not None}
    return emulator_main(EmulatorOptions(host, port, users, settings))


_BASH_COMPLETION = """# bash completion for geins-broker: source <(geins-broker completion bash)
_geins_broker() {
    local cur=${COMP_WORDS[COMP_CWORD]} command=${COMP_WORDS[1]}
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "%(commands)s" -- "$cur"))
        return
    fi
    case "$command" in
%(cases)s
    esac
}
complete -F _geins_broker geins-broker
"""


def cmd_completion(args: argparse.Namespace) -> int:
    cases = []
    for name in COMMANDS:
        words = " ".join(_options(command_parser(name)))
        cases.append(f'        {name}) COMPREPLY=($(compgen -W "{words}" -- "$cur"));;')
    print(_BASH_COMPLETION % {"commands": " ".join(COMMANDS), "cases": "\n".join(cases)}, end="")
    return EXIT_OK


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--")
    ]


def cmd_key(args: argparse.Namespace) -> int:
    """A new random key, to stdout or to a new 0600 file (never over an existing one)."""
    from broker.core.sealing import Key
    from broker.storage.keys import encode_key

    key = Key.generate()
    data = encode_key(key)
    if args.output in (None, "-"):
        sys.stdout.write(data.decode())
        sys.stdout.flush()
        print(f"key {key.name} written to stdout", file=sys.stderr)
        return EXIT_OK
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(args.output, flags, 0o600)
    except FileExistsError:
        raise UsageError(f"{args.output}: exists; a key file is never overwritten") from None
    except OSError as exc:
        raise UsageError(f"{args.output}: {exc.strerror}") from None
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"key {key.name} written to {args.output} (mode 0600)", file=sys.stderr)
    return EXIT_OK


def cmd_rekey(args: argparse.Namespace) -> int:
    from broker.storage.rekey import main as rekey_main

    return rekey_main(config_path=args.config)


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fleet is not None:
        from broker.cli.fleet_demo import main as fleet_demo

        return fleet_demo(args.fleet, token_ttl=args.token_ttl, duration=args.duration)
    if args.storefront:
        from broker.cli.storefront_demo import main as storefront_demo

        return storefront_demo(token_ttl=args.token_ttl)
    from broker.cli.demo import main as demo_main

    return demo_main(token_ttl=args.token_ttl)


# -- the parser ----------------------------------------------------------------------------


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _client_options(
    parser: argparse.ArgumentParser, *, json: bool = False, secrets: bool = False
) -> None:
    _socket_option(parser)
    parser.add_argument("--profile", help='the profile to act on (default: "default")')
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=60.0,
        help="seconds to wait for the daemon (default 60)",
    )
    if json:
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    if secrets:
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="read password(s) from stdin, one per line",
        )


def _cluster_options(parser: argparse.ArgumentParser) -> None:
    _socket_option(parser)
    parser.add_argument("--timeout", type=_positive, default=60.0, help="seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        help="the daemon's socket (default: $GEINS_BROKER_SOCKET, then the usual places)",
    )


def _status_options(parser: argparse.ArgumentParser) -> None:
    _client_options(parser, json=True)
    parser.add_argument(
        "--check",
        action="store_true",
        help="print one line and exit 0 healthy, 1 degraded, 4 not logged in, "
        "5 login required (for ExecCondition= and monitoring)",
    )


def _sessions_options(parser: argparse.ArgumentParser) -> None:
    _cluster_options(parser)
    parser.add_argument("app", help="the app, as in the config's [apps.NAME]")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--username", help="list only this customer's sessions")
    which.add_argument(
        "--end",
        metavar="USERNAME",
        help="end every session of this customer (log out everywhere)",
    )


def _metrics_options(parser: argparse.ArgumentParser) -> None:
    _socket_option(parser)
    parser.add_argument(
        "--timeout", type=_positive, default=60.0, help="seconds to wait for the daemon"
    )


def _token_options(parser: argparse.ArgumentParser) -> None:
    _client_options(parser, json=True)
    parser.add_argument(
        "--min-valid",
        type=_positive,
        default=0.0,
        metavar="SECONDS",
        help="refresh first unless the token lasts this long",
    )


def _login_options(parser: argparse.ArgumentParser) -> None:
    _client_options(parser, secrets=True)
    parser.add_argument("--username", "-u", help="the username (e-mail); prompted if absent")
    parser.add_argument(
        "--remember", action="store_true", help="ask Geins for a long-lived session"
    )


def _register_options(parser: argparse.ArgumentParser) -> None:
    # Only `register` pays for importing the protocol's values (not `token`'s start-up).
    from broker.geins.protocol import CUSTOMER_TYPES, DEFAULT_CUSTOMER_TYPE

    _login_options(parser)
    parser.add_argument("--customer-type", choices=CUSTOMER_TYPES, default=DEFAULT_CUSTOMER_TYPE)
    parser.add_argument("--newsletter", action="store_true")


def _serve_options(parser: argparse.ArgumentParser) -> None:
    _socket_option(parser)
    parser.add_argument(
        "--config", help="config file (default: $GEINS_BROKER_CONFIG, then the usual places)"
    )


def _emulator_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="port 0 picks a free one")
    # No defaults here: the emulator's own (broker/emulator/model/service.py ServiceConfig) apply.
    add("--account", help="default: demo")
    add("--environment", help="default: prod")
    add("--api-key", help="default: demo-api-key")
    add(
        "--user",
        action="append",
        metavar="USERNAME:PASSWORD",
        help="a user (repeatable; default: the demo user)",
    )
    add("--token-ttl", type=_positive, metavar="SECONDS", help="default: 900")
    add("--refresh-ttl", type=_positive, metavar="SECONDS", help="default: 7 days")
    add(
        "--refresh-grace",
        type=_positive,
        metavar="SECONDS",
        help="how long a replaced refresh token still works if unused (default 0: strict)",
    )


def _demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-ttl", type=_positive, default=20.0, metavar="SECONDS")
    parser.add_argument(
        "--fleet",
        type=int,
        choices=range(2, 10),
        metavar="N",
        help="fleet mode: redis-server and N daemons (2-9) sharing one session",
    )
    parser.add_argument(
        "--duration", type=_positive, metavar="SECONDS", help="stop after this long (--fleet)"
    )
    parser.add_argument(
        "--storefront",
        action="store_true",
        help="the example storefront (Node): customers log in through the broker in a browser",
    )


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("generate",))
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the key to FILE (created 0600, never overwritten) instead of stdout",
    )


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $GEINS_BROKER_CONFIG, then the usual places)"
    )


def _completion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=("bash",))


#: Every subcommand: what it does, its handler, and the options it takes. Only the
#: chosen one's parser is built, which keeps `geins-broker token` quick to start.
COMMANDS: dict[str, tuple[str, Handler, Options]] = {
    "status": (
        "show every profile's session (exit 5 if any needs a login)",
        cmd_status,
        _status_options,
    ),
    "metrics": (
        "print the daemon's metrics (Prometheus text format)",
        cmd_metrics,
        _metrics_options,
    ),
    "cluster": (
        "show the fleet: this node, the store's health, the nodes, each shared profile",
        cmd_cluster,
        _cluster_options,
    ),
    "token": ("print the current bearer token", cmd_token, _token_options),
    "user": ("show who the session belongs to", cmd_user, lambda p: _client_options(p, json=True)),
    "login": ("log a user in to a profile", cmd_login, _login_options),
    "register": ("register a new user and log in", cmd_register, _register_options),
    "logout": ("end the profile's session here and at Geins", cmd_logout, _client_options),
    "refresh": ("rotate the tokens now", cmd_refresh, _client_options),
    "passwd": (
        "change the logged-in user's password",
        cmd_passwd,
        lambda p: _client_options(p, secrets=True),
    ),
    "watch": (
        "print each token rotation until interrupted",
        cmd_watch,
        lambda p: _client_options(p, json=True),
    ),
    "sessions": (
        "list an app's customer sessions, or end a customer's (--end)",
        cmd_sessions,
        _sessions_options,
    ),
    "serve": ("run the broker daemon", cmd_serve, _serve_options),
    "emulator": ("run the Geins auth emulator", cmd_emulator, _emulator_options),
    "key": ("generate a key to seal sessions at rest", cmd_key, _key_options),
    "rekey": (
        "seal every saved session with the current key now (daemon stopped)",
        cmd_rekey,
        _config_option,
    ),
    "demo": ("emulator + daemon + demo login, printing each rotation", cmd_demo, _demo_options),
    "completion": ("print a shell completion script", cmd_completion, _completion_options),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, told the terminal width up front.

    Left to itself it imports shutil to ask, on every start and not only for --help:
    a few milliseconds of `geins-broker token`.
    """

    def __init__(self, prog: str) -> None:
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit():
            width = int(columns)
        else:
            try:
                width = os.get_terminal_size(sys.stdout.fileno()).columns
            except (OSError, ValueError):
                width = 80
        super().__init__(prog, width=max(width - 2, 40))


def top_parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {name:<12}{text}" for name, (text, _, _) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="geins-broker",
        usage="geins-broker [-h] [--version] COMMAND [OPTIONS]",
        description="Local token broker for Geins: one daemon keeps every session fresh.",
        epilog=f"commands:\n{listing}\n\n`geins-broker COMMAND --help` lists its options."
        f"\n\n{_EPILOG}",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"geins-broker {__version__}")
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def command_parser(name: str) -> argparse.ArgumentParser:
    text, handler, options = COMMANDS[name]
    parser = argparse.ArgumentParser(
        prog=f"geins-broker {name}", description=text, formatter_class=_Formatter
    )
    options(parser)
    parser.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    chosen = top_parser().parse_args(argv)
    args = command_parser(chosen.command).parse_args(chosen.args)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        return _report(str(exc), EXIT_USAGE)
    except EOFError:
        return _report("stdin closed before the input was complete", EXIT_USAGE)
    except client_errors.BrokerError as exc:
        return report_broker_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `geins-broker token | head -c0`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
