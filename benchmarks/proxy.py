"""The Merchant API proxy against nginx as the reference proxy.

Three targets, one fast upstream, one load generator, side by side in one run:

- direct: the upstream stub itself, an nginx (one worker) answering POST /graphql with
  a fixed GraphQL body (`return 200 '...'`);
- nginx: a second nginx (one worker) in front of the stub, injecting the same two
  static headers (Authorization, x-apikey) with keep-alive to the stub;
- geins-broker: the daemon's proxy on loopback TCP in front of the same stub, logged in
  against the emulator, injecting the profile's bearer and API key.

For each of 1, 16 and 64 connections the three are measured one after the other, with
the project's own load generator (httpload.py) and then with wrk -t1 (wrk.py), and
that is repeated; medians of the repetitions are reported, with the geins/nginx req/s
ratio (median of the per-slot ratios) and the p50/p99 each proxy adds to a direct call.
nginx and wrk come from Debian's packages (installed with apt-get if missing, as root).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.support import (
    DEMO_PASSWORD,
    DEMO_USER,
    DaemonProcess,
    EmulatorProcess,
    call,
    write_config,
)

from . import httpload, wrk

FIXED_BODY = '{"data":{"getUser":{"id":1000,"email":"demo@example.com","customerType":"PERSON"}}}'
QUERY = b'{"query":"{ getUser { id email customerType } }"}'
CONNECTIONS = (1, 16, 64)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ensure_nginx() -> str:
    found = shutil.which("nginx") or (Path("/usr/sbin/nginx").exists() and "/usr/sbin/nginx")
    if found:
        return str(found)
    subprocess.run(["apt-get", "install", "-y", "-q", "nginx-light"], check=True, timeout=600)
    return "/usr/sbin/nginx"


def _nginx_conf(workdir: Path, name: str, server: str) -> Path:
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(mode=0o777)
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
{server}
}}
"""
    )
    return conf


@contextlib.contextmanager
def _nginx(binary: str, conf: Path, port: int) -> Iterator[None]:
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        _wait_port(port, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stderr:
            process.stderr.close()


def _wait_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"nginx exited: {err}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def _export(revision: str, into: Path) -> Path:
    """This repository's daemon (broker/) as it was at `revision`, in a directory of
    its own, to run beside the current one."""
    into.mkdir()
    repo = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "archive", revision, "broker"], cwd=repo, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _daemon(
    workdir: Path, emulator_url: str, stub_port: int, port: int, source: Path | None = None
) -> DaemonProcess:
    """A daemon logged in against the emulator, its proxy on `port` in front of the
    stub; `source`: run the broker package found there instead of the installed one."""
    workdir.mkdir(mode=0o755)
    config = write_config(
        workdir / "config.toml", emulator_url, workdir / "broker.sock", workdir / "state"
    )
    config.write_text(config.read_text() + f'[proxy]\ntcp = "127.0.0.1:{port}"\n')
    # The access log stays on (a line per request, to a file): it is part of the cost.
    # PYTHONSAFEPATH: not the current directory (this checkout) ahead of `source`.
    env = None if source is None else {"PYTHONPATH": str(source), "PYTHONSAFEPATH": "1"}
    daemon = DaemonProcess(config, workdir, env)
    answer = call(
        workdir / "broker.sock",
        op="login",
        profile="default",
        username=DEMO_USER,
        password=DEMO_PASSWORD,
    )
    assert answer["ok"], answer
    # Logged in (the signature service is on the emulator); now the Merchant API
    # is the stub: a reload moves the profile there and keeps its session.
    text = config.read_text().replace(
        f'merchant_api_url = "{emulator_url}"',
        f'merchant_api_url = "http://127.0.0.1:{stub_port}"',
    )
    config.write_text(text)
    daemon.notify.drain()
    daemon.notify.messages.clear()
    daemon.send_signal(signal.SIGHUP)
    daemon.notify.wait_for("READY=1", 10)
    return daemon


def run(
    repeat: int = 3, duration: float = 2.0, warmup: float = 0.5, baseline: str | None = None
) -> dict[str, Any]:
    """`baseline`: a git revision whose daemon is measured too, in the same slots."""
    binary = ensure_nginx()
    wrk_binary = wrk.ensure_wrk()
    workdir = Path(tempfile.mkdtemp(prefix="gb-bench-", dir="/tmp"))
    workdir.chmod(0o755)
    stub_port, nginx_port, geins_port = _free_port(), _free_port(), _free_port()
    stub_conf = _nginx_conf(
        workdir,
        "stub",
        f"""    server {{
        listen 127.0.0.1:{stub_port};
        location = /graphql {{ default_type application/json; return 200 '{FIXED_BODY}'; }}
    }}""",
    )
    proxy_conf = _nginx_conf(
        workdir,
        "proxy",
        f"""    upstream stub {{ server 127.0.0.1:{stub_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{nginx_port};
        location / {{
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer bench-static-token";
            proxy_set_header x-apikey "demo-api-key";
        }}
    }}""",
    )
    emulator = EmulatorProcess("--token-ttl", "3600")
    request = httpload.request_bytes("/graphql", QUERY)
    targets = {"direct": stub_port, "nginx": nginx_port, "geins": geins_port}
    daemons: dict[str, DaemonProcess] = {}
    runs: dict[int, list[dict[str, dict[str, float]]]] = {c: [] for c in CONNECTIONS}
    wrk_runs: dict[int, list[dict[str, dict[str, float]]]] = {c: [] for c in CONNECTIONS}
    try:
        daemons["geins"] = _daemon(workdir / "geins", emulator.url, stub_port, geins_port)
        if baseline is not None:
            source = _export(baseline, workdir / "baseline-src")
            targets["baseline"] = _free_port()
            daemons["baseline"] = _daemon(
                workdir / "baseline", emulator.url, stub_port, targets["baseline"], source
            )
        with _nginx(binary, stub_conf, stub_port), _nginx(binary, proxy_conf, nginx_port):
            for _ in range(repeat):
                for connections in CONNECTIONS:
                    slot = {
                        name: httpload.measure(
                            ("127.0.0.1", port),
                            request,
                            connections,
                            duration=duration,
                            warmup=warmup,
                            cpu_of=daemons[name].process.pid if name in daemons else None,
                        )
                        for name, port in targets.items()
                    }
                    runs[connections].append(slot)
                    wrk_runs[connections].append(
                        {
                            name: wrk.measure(
                                wrk_binary,
                                port,
                                QUERY,
                                connections,
                                duration=duration,
                                cpu_of=daemons[name].process.pid if name in daemons else None,
                            )
                            for name, port in targets.items()
                        }
                    )
    finally:
        for daemon in daemons.values():
            daemon.close()
        emulator.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "repeat": repeat,
        "duration": duration,
        "baseline": baseline,
        "cells": _summarise(runs),
        "wrk": _summarise(wrk_runs),
    }


def _summarise(runs: dict[int, list[dict[str, dict[str, float]]]]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for connections, slots in runs.items():
        cell: dict[str, Any] = {}
        for name in ("direct", "nginx", "geins"):
            for key in ("rps", "p50_us", "p99_us"):
                cell[f"{name}_{key}"] = statistics.median(s[name][key] for s in slots)
        cell["ratio"] = statistics.median(s["geins"]["rps"] / s["nginx"]["rps"] for s in slots)
        cell["geins_cpu_us"] = statistics.median(s["geins"]["cpu_us"] for s in slots)
        if "baseline" in slots[0]:
            for key in ("rps", "cpu_us"):
                cell[f"baseline_{key}"] = statistics.median(s["baseline"][key] for s in slots)
            for key in ("p50_us", "p99_us"):
                cell[f"baseline_added_{key}"] = statistics.median(
                    s["baseline"][key] - s["direct"][key] for s in slots
                )
            cell["baseline_ratio"] = statistics.median(
                s["baseline"]["rps"] / s["nginx"]["rps"] for s in slots
            )
            cell["speedup"] = statistics.median(
                s["geins"]["rps"] / s["baseline"]["rps"] for s in slots
            )
        for name in ("nginx", "geins"):
            for key in ("p50_us", "p99_us"):
                cell[f"{name}_added_{key}"] = statistics.median(
                    s[name][key] - s["direct"][key] for s in slots
                )
        cells[str(connections)] = cell
    return cells


def table(result: dict[str, Any]) -> str:
    rows = _table(result, result["cells"])
    if "wrk" in result:
        rows += ["", "The same targets in the same slots, measured with `wrk -t1`:", ""]
        rows += _table(result, result["wrk"])
    return "\n".join(rows)


def _table(result: dict[str, Any], cells: dict[str, Any]) -> list[str]:
    rows = [
        "| connections | direct req/s | nginx req/s | geins-broker req/s | geins/nginx | nginx adds p50 / p99 µs | geins-broker adds p50 / p99 µs | daemon CPU µs/req |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for connections, c in cells.items():
        rows.append(
            f"| {connections} | {c['direct_rps']:,.0f} | {c['nginx_rps']:,.0f} | {c['geins_rps']:,.0f} "
            f"| {c['ratio']:.2f} | {c['nginx_added_p50_us']:.0f} / {c['nginx_added_p99_us']:.0f} "
            f"| {c['geins_added_p50_us']:.0f} / {c['geins_added_p99_us']:.0f} "
            f"| {c['geins_cpu_us']:.0f} |"
        )
    if result.get("baseline"):
        rows += [
            "",
            f"Beside it in the same slots, the daemon as of `{result['baseline']}`:",
            "",
            "| connections | baseline req/s | /nginx | adds p50 / p99 µs | CPU µs/req | now/baseline req/s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for connections, c in cells.items():
            rows.append(
                f"| {connections} | {c['baseline_rps']:,.0f} | {c['baseline_ratio']:.2f} "
                f"| {c['baseline_added_p50_us']:.0f} / {c['baseline_added_p99_us']:.0f} "
                f"| {c['baseline_cpu_us']:.0f} | {c['speedup']:.2f} |"
            )
    return rows
