"""The subcommands that act on one profile's session through the daemon: `token`,
`user`, `login`, `register`, `logout`, `refresh`, `passwd`, `watch`, and how they read
usernames and passwords (a prompt without echo, or `--password-stdin`)."""

from __future__ import annotations

import sys
import time

from broker.cli.exits import EXIT_OK, UsageError
from broker.cli.options import client_for
from broker.cli.output import (
    countdown,
    iso_time,
    print_json,
    print_token,
    terminal_safe,
    token_fields,
)

TYPE_CHECKING = False  # not even typing at run time, as in the rest of the CLI
if TYPE_CHECKING:
    import argparse

    from geins_broker_client.results import Session


def cmd_token(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        token = client.token(args.profile, min_valid=args.min_valid)
    print_token(token, as_json=args.json)
    return EXIT_OK


def cmd_user(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        user = client.user(args.profile)
    fields = user._asdict()
    if args.json:
        print_json(fields)
    else:
        for name, value in fields.items():
            shown = iso_time(value) if name == "expires_at" else terminal_safe(value)
            print(f"{name:16} {shown}")
    return EXIT_OK


def cmd_login(args: argparse.Namespace) -> int:
    username = _username(args)
    password = _stdin_lines(1)[0] if args.password_stdin else _prompt("Password")
    with client_for(args) as client:
        session = client.login(username, password, profile=args.profile, remember=args.remember)
    print(_session_line("logged in to", session))
    return EXIT_OK


def cmd_logout(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        client.logout(args.profile)
    print(f"logged out of profile {args.profile or 'default'}")
    return EXIT_OK


def cmd_refresh(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        session = client.refresh(args.profile)
    print(_session_line("refreshed", session))
    return EXIT_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    if args.password_stdin:
        current, new = _stdin_lines(2)
    else:
        current, new = _prompt("Current password"), _new_password()
    with client_for(args) as client:
        session = client.change_password(current, new, profile=args.profile)
    print(_session_line("changed the password of", session))
    return EXIT_OK


def cmd_register(args: argparse.Namespace) -> int:
    username = _username(args)
    password = _stdin_lines(1)[0] if args.password_stdin else _new_password()
    user = {"newsletter": args.newsletter, "customerType": args.customer_type}
    with client_for(args) as client:
        session = client.register(
            username, password, profile=args.profile, remember=args.remember, user=user
        )
    print(_session_line("registered and logged in to", session))
    return EXIT_OK


def cmd_watch(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        try:
            for event in client.watch(args.profile):
                if args.json:
                    token = token_fields(event.token) if event.token else {}
                    print_json({"event": event.event, **token})
                elif event.token is not None:
                    now = time.time()
                    profile = terminal_safe(event.token.profile)
                    expires_at = event.token.expires_at
                    print(
                        f"{iso_time(now)} token for {profile}: expires "
                        f"{iso_time(expires_at)} (in {countdown(expires_at, now)})",
                        flush=True,
                    )
                else:
                    what = terminal_safe(event.event.replace("_", " "))
                    print(f"{iso_time(time.time())} {what}", flush=True)
        except KeyboardInterrupt:
            return EXIT_OK
    return EXIT_OK


def _session_line(verb: str, session: Session) -> str:
    who = f" as {session.username}" if session.username else ""
    expires = countdown(session.expires_at, time.time())
    return terminal_safe(f"{verb} profile {session.profile}{who}; token expires in {expires}")


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
