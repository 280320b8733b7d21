"""wrk (Debian's package) as the outside load generator for the proxy benchmark.

`wrk -t1` (one thread, as the issue measured), keep-alive, POST with a fixed body;
what it prints is parsed for req/s, the latency percentiles and the request count, and
the target's CPU time (user + system, /proc) over the run gives CPU per request. wrk
has no warm-up: the project's own generator (httpload.py) runs first in each slot.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .httpload import _cpu_seconds

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def ensure_wrk() -> str:
    found = shutil.which("wrk") or (Path("/usr/bin/wrk").exists() and "/usr/bin/wrk")
    if found:
        return str(found)
    subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, timeout=600)
    return "/usr/bin/wrk"


def _script(body: bytes) -> Path:
    text = (
        'wrk.method = "POST"\n'
        f"wrk.body = {_lua_string(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        'wrk.headers["Host"] = "geins"\n'
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="gb-wrk-", delete=False) as handle:
        handle.write(text)
    return Path(handle.name)


def _lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in data) + '"'


def measure(
    binary: str,
    port: int,
    body: bytes,
    connections: int,
    *,
    duration: float = 2.0,
    cpu_of: int | None = None,
) -> dict[str, float]:
    script = _script(body)
    try:
        command = [
            binary,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "-s",
            str(script),
            f"http://127.0.0.1:{port}/graphql",
        ]
        before = _cpu_seconds(cpu_of) if cpu_of is not None else 0.0
        out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
        cpu = _cpu_seconds(cpu_of) - before if cpu_of is not None else None
    finally:
        script.unlink()
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"wrk saw error answers:\n{out}")
    result = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_us": _latency(out, "50%"),
        "p99_us": _latency(out, "99%"),
        "requests": requests,
    }
    if cpu is not None:
        result["cpu_us"] = cpu * 1e6 / max(1, requests)
    return result


def _latency(out: str, percentile: str) -> float:
    found = re.search(rf"{percentile}\s+([\d.]+)(us|ms|s)\b", out)
    if found is None:
        raise RuntimeError(f"no {percentile} latency in wrk's output:\n{out}")
    return float(found.group(1)) * _UNITS[found.group(2)]
