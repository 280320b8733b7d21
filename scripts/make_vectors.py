"""Write docs/protocol-vectors.json from the Python codec: the wire, as both clients must see it.

    python scripts/make_vectors.py            # (re)write the file
    python scripts/make_vectors.py --check    # exit 1 if the file differs from what this writes

Every frame in the file is produced here by `geins_broker_client.protocol.encode` and the
request builders in `geins_broker_client.calls`, the same code the daemon and the Python
client run, so the file cannot drift from the daemon: scripts/test runs `--check`. The
Python tests (tests/client/test_protocol_vectors.py) and the Node tests
(clients/node/test/vectors.test.ts) check their codecs, error classes, socket search and
socket trust rule against it.
"""

# ruff: noqa: S108 - the socket-path cases name /tmp paths; nothing here opens them

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from geins_broker_client import calls, errors
from geins_broker_client.protocol import MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, Code, encode

VECTORS = Path(__file__).resolve().parent.parent / "docs" / "protocol-vectors.json"

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJl"  # noqa: S105 - a made-up JWT
EXPIRES = 1800000900.5
#: A made-up customer session handle: 43 characters of base64url.
HANDLE = "q4Vz0kJH3m2R9xT7bWcL1sNpYfAeGdUiO5_8-hKjMvE"

#: Each request as a Python `calls` builder name and its keyword arguments.
REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("hello", {}),
    ("hello", {"client": "geins-broker-client-node/0.1.0"}),
    ("token", {}),
    ("token", {"profile": "shop", "min_valid": 60}),
    ("token", {"min_valid": 0.5}),
    ("user", {"profile": "shop"}),
    ("status", {}),
    ("login", {"username": "demo@example.com", "password": "pässword", "remember": True}),
    ("login", {"username": "demo@example.com", "password": "pw", "profile": "shop"}),
    ("logout", {}),
    ("refresh", {"profile": "shop"}),
    ("change_password", {"password": "old", "new_password": "new", "profile": "shop"}),
    ("register", {"username": "new@example.com", "password": "pw"}),
    (
        "register",
        {
            "username": "new@example.com",
            "password": "pw",
            "remember": True,
            "user": {"newsletter": True, "customerType": "ORGANIZATION"},
        },
    ),
    ("watch", {"profile": "shop"}),
    (
        "session_login",
        {"app": "shop", "username": "demo@example.com", "password": "pässword", "remember": True},
    ),
    ("session_login", {"app": "shop", "username": "demo@example.com", "password": "pw"}),
    (
        "session_register",
        {
            "app": "shop",
            "username": "new@example.com",
            "password": "pw",
            "user": {"newsletter": True, "customerType": "PERSON"},
        },
    ),
    ("session_token", {"app": "shop", "handle": HANDLE}),
    ("session_token", {"app": "shop", "handle": HANDLE, "min_valid": 60}),
    ("session_info", {"app": "shop", "handle": HANDLE}),
    (
        "session_passwd",
        {"app": "shop", "handle": HANDLE, "password": "old", "new_password": "new"},
    ),
    ("session_logout", {"app": "shop", "handle": HANDLE}),
    ("sessions", {"app": "shop"}),
    ("sessions", {"app": "shop", "username": "demo@example.com"}),
    ("session_end", {"app": "shop", "username": "demo@example.com"}),
]

ANSWERS: list[tuple[str, dict[str, Any]]] = [
    (
        "hello",
        {"id": 1, "ok": True, "v": 1, "server": "geins-broker/0.1.0", "ops": ["hello", "token"]},
    ),
    ("token", {"id": 2, "ok": True, "profile": "default", "token": TOKEN, "expires_at": EXPIRES}),
    (
        "token, whole expiry",
        {"id": 3, "ok": True, "profile": "default", "token": TOKEN, "expires_at": 1800000900.0},
    ),
    (
        "user",
        {
            "id": 4,
            "ok": True,
            "profile": "default",
            "user_id": "42",
            "username": "demo@example.com",
            "customer_type": "PERSON",
            "member_type": "",
            "member_id": "",
            "member_discount": "0",
            "expires_at": EXPIRES,
        },
    ),
    (
        "status",
        {
            "id": 5,
            "ok": True,
            "server": "geins-broker/0.1.0",
            "uptime": 12.25,
            "profiles": [
                {
                    "profile": "default",
                    "state": "active",
                    "username": "demo@example.com",
                    "expires_at": EXPIRES,
                    "next_refresh_at": 1800000675.0,
                    "last_refresh_at": 1800000000.0,
                    "refreshes": 3,
                    "failures": 0,
                    "last_error": None,
                },
                {
                    "profile": "idle",
                    "state": "logged_out",
                    "username": None,
                    "expires_at": None,
                    "next_refresh_at": None,
                    "last_refresh_at": None,
                    "refreshes": 0,
                    "failures": 0,
                    "last_error": None,
                },
            ],
        },
    ),
    (
        "session",
        {
            "id": 6,
            "ok": True,
            "profile": "default",
            "username": "demo@example.com",
            "expires_at": EXPIRES,
        },
    ),
    ("logout", {"id": 7, "ok": True, "profile": "default"}),
    (
        "metrics",
        {
            "id": 8,
            "ok": True,
            "text": "# HELP geins_broker_connections Client connections open now.\n"
            "# TYPE geins_broker_connections gauge\ngeins_broker_connections 1.0\n"
            'geins_broker_session_state{profile="default",state="active"} 1.0\n',
            "content_type": "text/plain; version=0.0.4; charset=utf-8",
        },
    ),
    (
        "session_login",
        {
            "id": 10,
            "ok": True,
            "app": "shop",
            "handle": HANDLE,
            "username": "demo@example.com",
            "expires_at": EXPIRES,
            "session_ends_at": 1800604800.0,
            "remember": True,
        },
    ),
    (
        "session_login, no absolute end",
        {
            "id": 11,
            "ok": True,
            "app": "shop",
            "handle": HANDLE,
            "username": "demo@example.com",
            "expires_at": EXPIRES,
            "session_ends_at": None,
            "remember": False,
        },
    ),
    ("session_token", {"id": 12, "ok": True, "token": TOKEN, "expires_at": EXPIRES}),
    (
        "session_info",
        {
            "id": 13,
            "ok": True,
            "username": "demo@example.com",
            "customer_type": "PERSON",
            "expires_at": EXPIRES,
            "session_ends_at": 1800001800.0,
            "remember": False,
        },
    ),
    ("session_passwd", {"id": 14, "ok": True, "expires_at": EXPIRES}),
    ("session_logout", {"id": 15, "ok": True}),
    (
        "sessions",
        {
            "id": 16,
            "ok": True,
            "sessions": [
                {
                    "session": "9f86d081",
                    "username": "demo@example.com",
                    "created_at": 1800000000.0,
                    "last_used_at": 1800000600.25,
                    "ends_at": 1800604800.0,
                },
                {
                    "session": "2c26b46b",
                    "username": None,
                    "created_at": 1800000000.0,
                    "last_used_at": 1800000000.0,
                    "ends_at": 1800001800.0,
                },
            ],
        },
    ),
    ("session_end", {"id": 17, "ok": True, "ended": 3}),
    (
        "status with apps",
        {
            "id": 18,
            "ok": True,
            "server": "geins-broker/0.1.0",
            "uptime": 12.25,
            "profiles": [],
            "apps": [{"app": "shop", "sessions": 1200, "in_memory": 310}],
        },
    ),
    (
        "rate_limited with retry_after",
        {
            "id": 19,
            "ok": False,
            "error": {
                "code": "rate_limited",
                "message": "too many login attempts; retry in 42 s",
                "retry_after": 41.5,
            },
        },
    ),
    (
        "busy before any request",
        {"id": None, "ok": False, "error": {"code": "busy", "message": "too many connections"}},
    ),
    (
        "large id",
        {"id": 4294967296, "ok": True, "profile": "default", "token": TOKEN, "expires_at": EXPIRES},
    ),
]

#: Frames a reader must refuse, each with the limit it reads with.
BAD_FRAMES: list[tuple[str, str, int]] = [
    ("over the request limit", (MAX_REQUEST_SIZE + 1).to_bytes(4, "big").hex(), MAX_REQUEST_SIZE),
    ("empty body", "00000000", MAX_REQUEST_SIZE),
    ("not msgpack", "00000001c1", MAX_REQUEST_SIZE),
    ("truncated msgpack", "0000000282a2", MAX_REQUEST_SIZE),
    ("two values in one frame", "000000028080", MAX_REQUEST_SIZE),
    ("an array, not a map", "000000019101", MAX_REQUEST_SIZE),
    ("a string, not a map", "00000003a26964", MAX_REQUEST_SIZE),
    ("an integer key", "00000003810102", MAX_REQUEST_SIZE),
    (
        "over the response limit",
        (MAX_RESPONSE_SIZE + 1).to_bytes(4, "big").hex(),
        MAX_RESPONSE_SIZE,
    ),
]

WATCH_EVENTS: list[dict[str, Any]] = [
    {
        "id": 5,
        "ok": True,
        "event": "token",
        "profile": "default",
        "token": TOKEN + "1",
        "expires_at": EXPIRES,
    },
    {
        "id": 5,
        "ok": True,
        "event": "token",
        "profile": "default",
        "token": TOKEN + "2",
        "expires_at": EXPIRES + 675,
    },
    {"id": 5, "ok": True, "event": "logged_out"},
    {"id": 5, "ok": True, "event": "login_required"},
]

#: Environments and the default socket candidates, in order; `{uid}` is the client's euid.
SOCKET_PATHS: list[dict[str, Any]] = [
    {
        "env": {},
        "candidates": [
            "/run/user/{uid}/geins-broker/broker.sock",
            "/tmp/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
    {
        "env": {"XDG_RUNTIME_DIR": "/run/user/{uid}"},
        "candidates": [
            "/run/user/{uid}/geins-broker/broker.sock",
            "/tmp/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
    {
        "env": {"XDG_RUNTIME_DIR": "/x", "TMPDIR": "/t"},
        "candidates": [
            "/x/geins-broker/broker.sock",
            "/run/user/{uid}/geins-broker/broker.sock",
            "/t/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
    {
        "env": {"XDG_RUNTIME_DIR": "", "TEMP": "/temp", "TMP": "/tmp2"},
        "candidates": [
            "/run/user/{uid}/geins-broker/broker.sock",
            "/temp/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
    {
        "env": {"TMP": "/tmp2"},
        "candidates": [
            "/run/user/{uid}/geins-broker/broker.sock",
            "/tmp2/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
    {
        "env": {"GEINS_BROKER_SOCKET": "/elsewhere/b.sock"},
        "explicit": "/elsewhere/b.sock",
        "candidates": [
            "/run/user/{uid}/geins-broker/broker.sock",
            "/tmp/runtime-{uid}/geins-broker/broker.sock",
            "/run/geins-broker/broker.sock",
        ],
    },
]

#: The trust rule over lstat results: uids 1000 (the client), 0 and 999 (geins-broker) trusted.
TRUSTED = [1000, 0, 999]


def _stat(kind: str | None, uid: int = 1000, mode: int = 0o700) -> dict[str, Any] | None:
    return None if kind is None else {"type": kind, "uid": uid, "mode": mode}


TRUST_CASES: list[tuple[str, dict[str, Any] | None, dict[str, Any] | None, bool]] = [
    ("own 0700 directory, own socket", _stat("directory"), _stat("socket", mode=0o600), True),
    (
        "root's 0755 directory, root's socket",
        _stat("directory", 0, 0o755),
        _stat("socket", 0, 0o666),
        True,
    ),
    (
        "geins-broker's directory and socket",
        _stat("directory", 999, 0o750),
        _stat("socket", 999, 0o660),
        True,
    ),
    ("own directory, root's socket", _stat("directory"), _stat("socket", 0, 0o600), True),
    ("sticky /tmp-like directory", _stat("directory", 0, 0o1777), _stat("socket"), False),
    ("group-writable directory", _stat("directory", mode=0o770), _stat("socket"), False),
    ("other-writable directory", _stat("directory", mode=0o703), _stat("socket"), False),
    ("directory of another uid", _stat("directory", 65534, 0o700), _stat("socket"), False),
    ("directory is a symlink", _stat("symlink", mode=0o777), _stat("socket"), False),
    ("directory is a file", _stat("file", mode=0o600), None, False),
    ("socket of another uid", _stat("directory"), _stat("socket", 65534, 0o777), False),
    ("socket is a symlink", _stat("directory"), _stat("symlink", mode=0o777), False),
    ("socket is a regular file", _stat("directory"), _stat("file", mode=0o600), False),
    ("missing socket under a 0777 directory", _stat("directory", 65534, 0o777), None, False),
    # Nothing there is nothing to distrust: connecting says "not running".
    ("socket missing", _stat("directory"), None, True),
    ("directory missing", None, None, True),
]


def _hex(message: dict[str, Any]) -> str:
    return encode(message).hex()


def build() -> dict[str, Any]:
    requests = []
    for name, kwargs in REQUESTS:
        call = getattr(calls, name)(**kwargs)
        request_id, frame = calls.Exchange().request(call)
        message = {"id": request_id, "op": call.op, **call.args}
        requests.append(
            {
                "call": name,
                "args": kwargs,
                "idempotent": call.idempotent,
                "message": message,
                "hex": frame.hex(),
            }
        )
    families = errors._FAMILIES
    return {
        "version": 1,
        "about": "Generated by scripts/make_vectors.py from the Python codec; do not edit. "
        "Frames are hex (4-byte big-endian length, then one msgpack map); requests must be "
        "encoded byte for byte, answers decoded to `message`.",
        "requests": requests,
        "answers": [{"name": n, "message": m, "hex": _hex(m)} for n, m in ANSWERS],
        "error_codes": [
            {
                "code": code,
                "family": families[code].__name__,
                "message": f"the daemon says {code}",
                "hex": _hex(
                    {
                        "id": 9,
                        "ok": False,
                        "error": {"code": code, "message": f"the daemon says {code}"},
                    }
                ),
            }
            for code in Code.ALL
        ],
        "bad_frames": [{"name": n, "hex": h, "max_size": m} for n, h, m in BAD_FRAMES],
        "watch": {
            "request": _hex({"id": 5, "op": "watch", "profile": "default"}),
            "stream": "".join(_hex(e) for e in WATCH_EVENTS),
            "events": WATCH_EVENTS,
        },
        "socket_paths": SOCKET_PATHS,
        "trust": {
            "about": "lstat of the socket's directory and of the socket (null: does not "
            "exist) -> accept: no problem with rules 1 and 2 (docs/protocol.md, 'Finding and "
            "trusting the socket'). The trusted uids stand for: the client (1000), root, "
            "geins-broker (999).",
            "trusted_uids": TRUSTED,
            "cases": [
                {"name": n, "directory": d, "socket": s, "accept": a} for n, d, s, a in TRUST_CASES
            ],
        },
    }


def render() -> str:
    return json.dumps(build(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = VECTORS.read_text(encoding="utf-8") if VECTORS.exists() else ""
        if current != text:
            print(f"{VECTORS} is out of date: run python scripts/make_vectors.py", file=sys.stderr)
            return 1
        print(f"{VECTORS.name} is up to date")
        return 0
    VECTORS.write_text(text, encoding="utf-8")
    print(f"wrote {VECTORS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
