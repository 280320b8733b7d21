"""What the hostile suites share: acting as another uid, and running the daemon once to
see it refuse."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.support import GEINS_BROKER, NOBODY, as_uid

#: An upstream nobody listens on: for a daemon that must refuse before it calls one.
UNUSED_URL = "http://127.0.0.1:9"


def as_nobody(*command: str) -> None:
    """Run `command` (mkdir, ln, mv: the attacker's set-up) as uid 65534, to its end."""
    subprocess.run(as_uid(NOBODY, *command), check=True, timeout=20)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that names a socket or runtime directory."""
    dropped = {"XDG_RUNTIME_DIR", "GEINS_BROKER_SOCKET", "RUNTIME_DIRECTORY", "TMPDIR"}
    return {k: v for k, v in os.environ.items() if k not in dropped} | extra


def serve_once(
    config: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`geins-broker serve` in `env` (else ours) until it exits, which a refusal makes
    it do at once."""
    environment = dict(os.environ if env is None else env)
    environment.pop("NOTIFY_SOCKET", None)
    return subprocess.run(
        [*GEINS_BROKER, "serve", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )


def assert_refused(result: subprocess.CompletedProcess[str], path: Path, problem: str) -> None:
    """The daemon refused with one line naming `path` and its `problem`, and exit 2."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"geins-broker: {path}: "), last
    assert problem in last, last


def forged_jwt(**claims: object) -> str:
    """A JWT carrying `claims` under a made-up signature: of a bearer, the daemon reads
    only the claims."""

    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256'})}.{part(claims)}.c2ln"
