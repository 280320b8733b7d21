"""The `geins-broker` command: its parser (the top level, then only the chosen
subcommand's) and the dispatch to the subcommand's handler.

The handlers live by what they do: `profile_commands` (one profile's session through the
daemon), `status_commands` (what the daemon reports), `local_commands` (work done in this
process: serve, emulator, demo, key, rekey); their options are in `options`. Client
subcommands import only the thin client library, so
`curl -H "Authorization: Bearer $(geins-broker token)"` pays for a socket round trip and
little else; `serve`, `emulator` and `demo` import the daemon's machinery when chosen.

Every expected failure is one line on stderr and a distinct exit code (see EXIT_CODES);
a traceback means a bug.
"""

from __future__ import annotations

import argparse
import os
import sys

from broker import __version__
from broker.cli import options
from broker.cli.exits import EXIT_MEANINGS, EXIT_OK, EXIT_USAGE, UsageError, report_broker_error
from broker.cli.exits import report as _report
from broker.cli.local_commands import cmd_demo, cmd_emulator, cmd_key, cmd_rekey, cmd_serve
from broker.cli.profile_commands import (
    cmd_login,
    cmd_logout,
    cmd_passwd,
    cmd_refresh,
    cmd_register,
    cmd_token,
    cmd_user,
    cmd_watch,
)
from broker.cli.status_commands import cmd_cluster, cmd_metrics, cmd_sessions, cmd_status
from geins_broker_client import errors as client_errors

# Not even typing is imported at run time on the way to `geins-broker token`.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[[argparse.Namespace], int]
    Options = Callable[[argparse.ArgumentParser], None]

_EPILOG = "exit codes: " + ", ".join(f"{code} {text}" for code, text in EXIT_MEANINGS.items())


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
        words = " ".join(_long_flags(command_parser(name)))
        cases.append(f'        {name}) COMPREPLY=($(compgen -W "{words}" -- "$cur"));;')
    print(_BASH_COMPLETION % {"commands": " ".join(COMMANDS), "cases": "\n".join(cases)}, end="")
    return EXIT_OK


def _long_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--")
    ]


#: Every subcommand: what it does, its handler, and the options it takes. Only the
#: chosen one's parser is built, which keeps `geins-broker token` quick to start.
COMMANDS: dict[str, tuple[str, Handler, Options]] = {
    "status": (
        "show every profile's session (exit 5 if any needs a login)",
        cmd_status,
        options.status_options,
    ),
    "metrics": (
        "print the daemon's metrics (Prometheus text format)",
        cmd_metrics,
        options.metrics_options,
    ),
    "cluster": (
        "show the fleet: this node, the store's health, the nodes, each shared profile",
        cmd_cluster,
        options.cluster_options,
    ),
    "token": ("print the current bearer token", cmd_token, options.token_options),
    "user": (
        "show who the session belongs to",
        cmd_user,
        lambda p: options.client_options(p, json=True),
    ),
    "login": ("log a user in to a profile", cmd_login, options.login_options),
    "register": ("register a new user and log in", cmd_register, options.register_options),
    "logout": ("end the profile's session here and at Geins", cmd_logout, options.client_options),
    "refresh": ("rotate the tokens now", cmd_refresh, options.client_options),
    "passwd": (
        "change the logged-in user's password",
        cmd_passwd,
        lambda p: options.client_options(p, secrets=True),
    ),
    "watch": (
        "print each token rotation until interrupted",
        cmd_watch,
        lambda p: options.client_options(p, json=True),
    ),
    "sessions": (
        "list an app's customer sessions, or end a customer's (--end)",
        cmd_sessions,
        options.sessions_options,
    ),
    "serve": ("run the broker daemon", cmd_serve, options.serve_options),
    "emulator": ("run the Geins auth emulator", cmd_emulator, options.emulator_options),
    "key": ("generate a key to seal sessions at rest", cmd_key, options.key_options),
    "rekey": (
        "seal every saved session with the current key now (daemon stopped)",
        cmd_rekey,
        options.config_option,
    ),
    "demo": (
        "emulator + daemon + demo login, printing each rotation",
        cmd_demo,
        options.demo_options,
    ),
    "completion": ("print a shell completion script", cmd_completion, options.completion_options),
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
