"""The options each `geins-broker` subcommand takes (argparse builders, one per
command, called only for the command chosen), and the client the common ones name.
"""

from __future__ import annotations

import argparse

from geins_broker_client import Client


def client_for(args: argparse.Namespace) -> Client:
    """A client of the daemon at `--socket` (or the usual places), waiting `--timeout`."""
    return Client(args.socket, timeout=args.timeout)


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def client_options(
    parser: argparse.ArgumentParser, *, json: bool = False, secrets: bool = False
) -> None:
    socket_option(parser)
    parser.add_argument("--profile", help='the profile to act on (default: "default")')
    parser.add_argument(
        "--timeout",
        type=non_negative,
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


def cluster_options(parser: argparse.ArgumentParser) -> None:
    socket_option(parser)
    parser.add_argument("--timeout", type=non_negative, default=60.0, help="seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        help="the daemon's socket (default: $GEINS_BROKER_SOCKET, then the usual places)",
    )


def status_options(parser: argparse.ArgumentParser) -> None:
    client_options(parser, json=True)
    parser.add_argument(
        "--check",
        action="store_true",
        help="print one line and exit 0 healthy, 1 degraded, 4 not logged in, "
        "5 login required (for ExecCondition= and monitoring)",
    )


def sessions_options(parser: argparse.ArgumentParser) -> None:
    cluster_options(parser)
    parser.add_argument("app", help="the app, as in the config's [apps.NAME]")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--username", help="list only this customer's sessions")
    which.add_argument(
        "--end",
        metavar="USERNAME",
        help="end every session of this customer (log out everywhere)",
    )


def metrics_options(parser: argparse.ArgumentParser) -> None:
    socket_option(parser)
    parser.add_argument(
        "--timeout", type=non_negative, default=60.0, help="seconds to wait for the daemon"
    )


def token_options(parser: argparse.ArgumentParser) -> None:
    client_options(parser, json=True)
    parser.add_argument(
        "--min-valid",
        type=non_negative,
        default=0.0,
        metavar="SECONDS",
        help="refresh first unless the token lasts this long",
    )


def login_options(parser: argparse.ArgumentParser) -> None:
    client_options(parser, secrets=True)
    parser.add_argument("--username", "-u", help="the username (e-mail); prompted if absent")
    parser.add_argument(
        "--remember", action="store_true", help="ask Geins for a long-lived session"
    )


def register_options(parser: argparse.ArgumentParser) -> None:
    # Only `register` pays for importing the protocol's values (not `token`'s start-up).
    from broker.geins.protocol import CUSTOMER_TYPES, DEFAULT_CUSTOMER_TYPE

    login_options(parser)
    parser.add_argument("--customer-type", choices=CUSTOMER_TYPES, default=DEFAULT_CUSTOMER_TYPE)
    parser.add_argument("--newsletter", action="store_true")


def serve_options(parser: argparse.ArgumentParser) -> None:
    socket_option(parser)
    config_option(parser)


def emulator_options(parser: argparse.ArgumentParser) -> None:
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
    add("--token-ttl", type=non_negative, metavar="SECONDS", help="default: 900")
    add("--refresh-ttl", type=non_negative, metavar="SECONDS", help="default: 7 days")
    add(
        "--refresh-grace",
        type=non_negative,
        metavar="SECONDS",
        help="how long a replaced refresh token still works if unused (default 0: strict)",
    )


def demo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-ttl", type=non_negative, default=20.0, metavar="SECONDS")
    parser.add_argument(
        "--fleet",
        type=int,
        choices=range(2, 10),
        metavar="N",
        help="fleet mode: redis-server and N daemons (2-9) sharing one session",
    )
    parser.add_argument(
        "--duration", type=non_negative, metavar="SECONDS", help="stop after this long (--fleet)"
    )
    parser.add_argument(
        "--storefront",
        action="store_true",
        help="the example storefront (Node): customers log in through the broker in a browser",
    )


def key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("generate",))
    parser.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write the key to FILE (created 0600, never overwritten) instead of stdout",
    )


def config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help="config file (default: $GEINS_BROKER_CONFIG, then the usual places)"
    )


def completion_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=("bash",))
