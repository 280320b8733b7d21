"""The proxy as real processes: curl, Node's fetch and httpx as callers, other uids
(setpriv), memory while streaming, and what the daemon's log says.

Real time: every wait is short and bounded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.proxy.stack import GET_USER, ProxyStack, proxy_stack
from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    NOBODY,
    as_uid,
    wait_until,
)


@pytest.fixture
def stack(short_tmp: Path) -> Iterator[ProxyStack]:
    with proxy_stack(short_tmp, shared_for=NOBODY) as started:
        yield started


def curl(*args: str, as_user: list[str] | None = None) -> tuple[int, Any]:
    """Run curl; (HTTP status, JSON body)."""
    out = subprocess.run(
        [*(as_user or []), "curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    body, _, status = out.rpartition("\n")
    return int(status), json.loads(body) if body else None


def graphql_args(stack: ProxyStack, via: str, *extra: str) -> list[str]:
    base = ["-H", "Content-Type: application/json", "-d", GET_USER, *extra]
    if via == "unix":
        return ["--unix-socket", str(stack.proxy_socket), *base, "http://geins/graphql"]
    return [*base, f"http://127.0.0.1:{stack.port}/graphql"]


def test_curl_reads_the_user_over_the_unix_socket(stack: ProxyStack) -> None:
    stack.login()
    status, body = curl(*graphql_args(stack, "unix"))
    assert status == 200
    assert body == {
        "data": {"getUser": {**body["data"]["getUser"], "email": DEMO_USER}},
    }


@pytest.mark.skipif(shutil.which("node") is None, reason="Node is not installed")
def test_node_fetch_reads_the_user_over_loopback_tcp(stack: ProxyStack) -> None:
    stack.login()
    script = f"""
const r = await fetch("http://127.0.0.1:{stack.port}/graphql", {{
  method: "POST",
  headers: {{"content-type": "application/json"}},
  body: JSON.stringify({{query: "{{ getUser {{ email }} }}"}}),
}});
console.log(JSON.stringify({{status: r.status, body: await r.json()}}));
"""
    out = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    answer = json.loads(out)
    assert answer["status"] == 200
    assert answer["body"]["data"]["getUser"]["email"] == DEMO_USER


def test_python_httpx_reads_the_user_over_loopback_tcp(stack: ProxyStack) -> None:
    stack.login()
    with httpx.Client(base_url=f"http://127.0.0.1:{stack.port}", timeout=10) as client:
        response = client.post("/graphql", json={"query": "{ getUser { email } }"})
    assert response.status_code == 200
    assert response.json()["data"]["getUser"]["email"] == DEMO_USER


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another uid needs root")
@pytest.mark.parametrize("via", ["unix", "tcp"])
def test_another_uid_gets_only_the_profiles_it_may_read(stack: ProxyStack, via: str) -> None:
    stack.login()
    stack.login("shared")
    status, body = curl(*graphql_args(stack, via), as_user=as_uid(NOBODY))
    assert status == 403
    assert body["errors"][0]["extensions"]["code"] == "forbidden"
    assert str(NOBODY) in body["errors"][0]["message"]
    status, body = curl(
        *graphql_args(stack, via, "-H", "Geins-Broker-Profile: shared"), as_user=as_uid(NOBODY)
    )
    assert status == 200
    assert body["data"]["getUser"]["email"] == DEMO_USER
    # The access log is written in batches, a moment after the answer.
    wait_until(lambda: f"uid={NOBODY}" in stack.daemon.log(), 5, "the access line")


def _peak_rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert match is not None
    return int(match.group(1))


def test_a_large_answer_streams_through_in_bounded_memory(stack: ProxyStack) -> None:
    stack.login()
    orders = json.dumps({"query": "{ getOrders { id note } }"})
    args = ["--unix-socket", str(stack.proxy_socket), "-H", "Content-Type: application/json"]
    url = "http://geins/graphql"
    for _ in range(3):  # warm up: pools, buffers, first-use allocations
        curl(*args, "-d", orders, url)
    before = _peak_rss_kib(stack.daemon.process.pid)
    stack.emulator.control(
        "POST", "orders", {"username": DEMO_USER, "count": 48, "note_size": 1 << 20}
    )
    size = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "30",
            *args,
            "-d",
            orders,
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{http_code}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert size[1] == "200"
    assert int(size[0]) > 48 << 20
    grown = _peak_rss_kib(stack.daemon.process.pid) - before
    assert grown < 16 * 1024, f"peak RSS grew {grown} KiB relaying {int(size[0]) >> 20} MiB"


def test_no_secret_in_any_log_line(stack: ProxyStack) -> None:
    stack.login()
    marker = "BODY-MARKER-c0ffee"
    secret_body = json.dumps({"query": "{ getUser { email } }", "variables": {"m": marker}})
    for extra in (
        ["-H", "Authorization: Bearer callers-own-bearer"],
        ["-H", "x-apikey: callers-own-key"],
        ["-H", "Geins-Broker-Profile: nope"],
        [],
    ):
        curl(
            "--unix-socket",
            str(stack.proxy_socket),
            "-H",
            "Content-Type: application/json",
            "-d",
            secret_body,
            *extra,
            "http://geins/graphql?token=q-secret",
        )
    state = json.loads(next(stack.state_dir.glob("default*.json")).read_text())
    stack.daemon.stop()
    log = stack.daemon.log()
    assert "event=request" in log
    assert "path=/graphql " in log
    secrets = ["eyJ", "demo-api-key", DEMO_PASSWORD, "callers-own", marker, "q-secret"]
    secrets += [
        str(v) for k, v in state.items() if "refresh" in k and isinstance(v, str) and len(v) > 8
    ]
    for line in log.splitlines():
        for secret in secrets:
            assert secret not in line, f"{secret[:6]}... in: {line[:120]}"
