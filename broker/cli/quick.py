"""The `geins-broker` command's entry point, with a fast path for the calls scripts make
in a loop: `geins-broker token` and `geins-broker status --check`.

`curl -H "Authorization: Bearer $(geins-broker token)"` starts a Python process per
call, so what that process imports before it opens the socket is most of its cost:
argparse, re and gettext alone take longer than the round trip to the daemon. The fast
path reads those two commands' options by hand, imports the blocking client and the exit
table, asks, and prints, with the same output and exit codes as the full CLI. Anything
else it does not recognise exactly (help, an unknown option, a value that is not a
number) goes to the full CLI (`broker.cli.main`), which parses it with argparse and
answers as it always has: the fast path never has an error message of its own.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not even typing is imported at run time on this path
if TYPE_CHECKING:
    from geins_broker_client import Client

#: The options each fast command takes, with whether each takes a value.
_OPTIONS: dict[str, dict[str, bool]] = {
    "token": {
        "--socket": True,
        "--profile": True,
        "--timeout": True,
        "--min-valid": True,
        "--json": False,
    },
    "status": {"--socket": True, "--profile": True, "--timeout": True, "--json": False},
}
#: Options whose value must be a number that is not negative (options.non_negative).
_NUMBERS = ("--timeout", "--min-valid")
_DEFAULT_TIMEOUT = 60.0


def fast_options(argv: list[str]) -> tuple[str, dict[str, str | bool]] | None:
    """The command and its options when `argv` is a fast command the full CLI would accept
    as it stands, or None (the full CLI then parses it, errors and help included)."""
    if not argv or argv[0] not in _OPTIONS:
        return None
    try:
        options = _read_options(argv[0], argv[1:])
    except _NotFast:
        return None
    if argv[0] == "status" and "--check" not in options:
        return None
    return argv[0], options


class _NotFast(Exception):
    """The words are not exactly what the fast path reads: the full CLI takes them."""


def _read_options(command: str, words: list[str]) -> dict[str, str | bool]:
    known = _OPTIONS[command]
    options: dict[str, str | bool] = {}
    rest = iter(words)
    for word in rest:
        name, equals, value = word.partition("=")
        if command == "status" and word == "--check":
            options["--check"] = True
        elif name not in known or name in options or (equals and not known[name]):
            raise _NotFast
        elif not known[name]:
            options[name] = True
        else:
            value = value if equals else next(rest, "")
            if not value or value.startswith("-"):
                raise _NotFast
            if name in _NUMBERS and not _is_non_negative(value):
                raise _NotFast
            options[name] = value
    return options


def _is_non_negative(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fast = fast_options(args)
    if fast is None:
        from broker.cli.main import main as full

        return full(args)
    from broker.cli.exits import EXIT_OK, report_broker_error
    from geins_broker_client import errors

    command, options = fast
    try:
        return _token(options) if command == "token" else _check(options)
    except errors.BrokerError as exc:
        return report_broker_error(exc)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `geins-broker token | head -c0`: the reader left; nothing to report.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _client(options: dict[str, str | bool]) -> Client:
    from geins_broker_client import Client

    socket = options.get("--socket")
    timeout = float(str(options.get("--timeout", _DEFAULT_TIMEOUT)))
    return Client(str(socket) if socket else None, timeout=timeout)


def _profile(options: dict[str, str | bool]) -> str | None:
    profile = options.get("--profile")
    return str(profile) if profile is not None else None


def _token(options: dict[str, str | bool]) -> int:
    with _client(options) as client:
        token = client.token(
            _profile(options), min_valid=float(str(options.get("--min-valid", 0.0)))
        )
    from broker.cli.output import print_token

    print_token(token, as_json=bool(options.get("--json")))
    return 0


def _check(options: dict[str, str | bool]) -> int:
    name = _profile(options)
    from broker.cli.exits import check_health

    with _client(options) as client:
        status = client.status()
    return check_health([p for p in status.profiles if name in (None, p.profile)], name)
