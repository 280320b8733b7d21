"""The subcommands that show what the daemon reports: `status` (every profile's
session, and fleet mode's view when there is one), `cluster`, `metrics`, and `sessions`
(an app's customer sessions, or ending a customer's everywhere)."""

from __future__ import annotations

import sys
import time

from broker.cli.exits import (
    EXIT_LOGIN_REQUIRED,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    check_health,
)
from broker.cli.options import client_for
from broker.cli.output import countdown, iso_time, print_json, table, terminal_safe

TYPE_CHECKING = False  # not even typing at run time, as in the rest of the CLI
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import Any

    from geins_broker_client.results import AppStatus, ProfileStatus


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
        print_json(answer)
    else:
        print(f"{terminal_safe(status.server)}, up {countdown(status.uptime, 0)}")
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


def cmd_cluster(args: argparse.Namespace) -> int:
    from broker.cli import fleet_report as report

    status, tables = _raw_status(args)
    if args.json:
        print_json(report.cluster_json(status.server, tables))
    else:
        print(report.fleet_summary(tables))
        if report.shared(tables):
            print(report.profile_table(tables))
    if not report.shared(tables):
        return EXIT_USAGE
    healthy = report.cluster_json(status.server, tables)["healthy"]
    return EXIT_OK if healthy else EXIT_UNAVAILABLE


def cmd_metrics(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        text = client.metrics()
    sys.stdout.write(terminal_safe(text, keep_newlines=True))
    return EXIT_OK


def cmd_sessions(args: argparse.Namespace) -> int:
    """An app's customer sessions (`--username`: one customer's), or `--end USERNAME`:
    end every session of that customer ("log out everywhere"). Admins only."""
    with client_for(args) as client:
        if args.end is not None:
            ended = client.session_end(args.app, args.end)
            if args.json:
                print_json({"app": args.app, "username": args.end, "ended": ended})
            else:
                print(terminal_safe(f"ended {ended} session(s) of {args.end} in app {args.app}"))
            return EXIT_OK
        listed = client.sessions(args.app, username=args.username)
    if args.json:
        print_json({"app": args.app, "sessions": [s._asdict() for s in listed]})
        return EXIT_OK
    now = time.time()
    rows = [("SESSION", "USER", "CREATED", "LAST USED", "ENDS IN")]
    rows += [
        (
            s.session,
            s.username or "-",
            iso_time(s.created_at),
            iso_time(s.last_used_at),
            countdown(s.ends_at, now),
        )
        for s in listed
    ]
    print(table(rows))
    return EXIT_OK


def _raw_status(args: argparse.Namespace) -> tuple[Any, list[dict[str, Any]]]:
    """The parsed status, and each profile's raw table (fleet mode adds to it)."""
    from geins_broker_client import calls

    with client_for(args) as client:
        raw = client.call(calls.status(), lambda message: message)
    status = calls.parse_status(raw)
    tables = [p for p in raw.get("profiles", []) if isinstance(p, dict)]
    return status, tables


def _status_table(profiles: Sequence[ProfileStatus], now: float) -> str:
    """`table`'s layout, but the last column (an error, of any length) is not padded."""
    rows = [("PROFILE", "STATE", "USER", "EXPIRES IN", "NEXT REFRESH", "LAST ERROR")]
    for p in profiles:
        rows.append(
            (
                p.profile,
                p.state,
                p.username or "-",
                countdown(p.expires_at, now),
                countdown(p.next_refresh_at, now),
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


def _apps_table(apps: Sequence[AppStatus]) -> str:
    rows = [("APP", "SESSIONS", "IN MEMORY")]
    rows += [(a.app, str(a.sessions), str(a.in_memory)) for a in apps]
    return table(rows)
