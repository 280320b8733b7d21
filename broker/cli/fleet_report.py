"""What `geins-broker status` and `geins-broker cluster` print about fleet mode.

Every value shown came from the fleet's store (node names, lease holders, the store's
error), which any local user may write: each is printed through `terminal_safe`.

A client-side module: it reads the `fleet` table that a shared profile's status
carries (generation, lease holder, committing node, the store's health and the nodes
seen recently) and imports nothing of the daemon's, nor any Redis client.
"""

from __future__ import annotations

from typing import Any

from broker.cli.output import terminal_safe


def shared(profiles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in profiles if isinstance(p.get("fleet"), dict)]


def profile_table(profiles: list[dict[str, Any]]) -> str:
    """One line per shared profile: its generation, who committed it, who holds the
    lease now."""
    rows = [("PROFILE", "GENERATION", "COMMITTED BY", "LEASE HELD BY")]
    for p in shared(profiles):
        fleet = p["fleet"]
        rows.append(
            (
                str(p.get("profile")),
                str(fleet.get("generation")),
                str(fleet.get("committed_by") or "-"),
                _lease(fleet),
            )
        )
    safe = [tuple(terminal_safe(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in safe) for i in range(len(safe[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in safe
    )


def _lease(fleet: dict[str, Any]) -> str:
    holder = str(fleet.get("lease_holder") or "-")
    if fleet.get("lease") == "held_without_expiry":
        return f"{holder} (NO EXPIRY: not a node's; rotation waits)"
    return holder


def fleet_summary(profiles: list[dict[str, Any]]) -> str:
    """This node, the store and its health, and the fleet's nodes seen recently."""
    tables = shared(profiles)
    if not tables:
        return "no shared profiles: this node is not in a fleet"
    fleet = tables[0]["fleet"]
    health = {True: "reachable", False: "UNREACHABLE", None: "not yet contacted"}[
        fleet.get("healthy")
    ]
    nodes = ", ".join(str(n) for n in fleet.get("nodes") or []) or "-"
    lines = [
        f"node {fleet.get('node')}, store {fleet.get('store')}: {health}",
        f"nodes seen recently: {nodes}",
    ]
    if fleet.get("last_error"):
        lines.append(f"last store error: {fleet['last_error']}")
    return "\n".join(terminal_safe(line) for line in lines)


def cluster_json(server: str, profiles: list[dict[str, Any]]) -> dict[str, Any]:
    tables = shared(profiles)
    first = tables[0]["fleet"] if tables else {}
    return {
        "server": server,
        "node": first.get("node"),
        "store": first.get("store"),
        "healthy": first.get("healthy"),
        "last_error": first.get("last_error"),
        "nodes": first.get("nodes", []),
        "profiles": [
            {"profile": p["profile"], "state": p.get("state"), **_profile_fleet(p["fleet"])}
            for p in tables
        ],
    }


def _profile_fleet(fleet: dict[str, Any]) -> dict[str, Any]:
    return {k: fleet.get(k) for k in ("generation", "committed_by", "lease_holder", "lease")}
