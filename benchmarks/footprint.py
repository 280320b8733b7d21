"""The CLI's start-up cost, the daemon's memory, its idle CPU, and a 10,000-profile restart."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.support import build_wheel, call

from .fleet import fleet

VENV_BIN = Path(sys.executable).parent


def cli(runs: int = 40) -> dict[str, Any]:
    """Whole-process wall time of `geins-broker token` against `python -c pass`, both as
    the development tree runs it (scripts/_venv.sh's launcher) and as pip installs it
    (the project's wheel installed into a directory of its own: pip's own treatment of
    the launcher, and the modules from the wheel).

    As installed for real: bytecode compiled and cached (some environments set
    PYTHONDONTWRITEBYTECODE, which would recompile every module on every run).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "broker", "clients/python"],
        cwd=root,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with tempfile.TemporaryDirectory(prefix="gbb-pip-") as scratch, fleet(1) as daemon:
        installed = _pip_installed(Path(scratch))
        token = ["token", "--socket", str(daemon.socket)]
        commands = {
            "token": ([str(VENV_BIN / "geins-broker"), *token], env),
            "token_pip": (
                [str(installed / "bin" / "geins-broker"), *token],
                {**env, "PYTHONPATH": str(installed)},
            ),
            "python": ([sys.executable, "-c", "pass"], env),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):  # alternate, so drift hits all alike
            for name, (argv, environment) in commands.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=environment)
                times[name].append(time.perf_counter() - start)
    token_ms, pip_ms, python_ms = (
        statistics.median(times[name]) * 1000 for name in ("token", "token_pip", "python")
    )
    return {
        "runs": runs,
        "token_ms": token_ms,
        "token_pip_ms": pip_ms,
        "python_ms": python_ms,
        "ratio": token_ms / python_ms,
        "ratio_pip": pip_ms / python_ms,
    }


def _pip_installed(directory: Path) -> Path:
    """The project's wheel and the client's, installed by pip into `directory/target`
    (its dependencies come from this venv)."""
    wheel = build_wheel(directory)
    target = directory / "target"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
            str(Path(__file__).resolve().parent.parent / "clients/python"),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(target)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return target


def memory(sizes: tuple[int, ...] = (1, 100, 10_000)) -> dict[str, Any]:
    """RSS of the idle daemon holding that many logged-in profiles."""
    rows = {}
    for size in sizes:
        with fleet(size) as daemon:
            call(daemon.socket, op="token")
            time.sleep(1.0)
            rows[str(size)] = daemon.rss_mib()
    return {"rss_mib": rows}


def idle(profiles: int = 100, seconds: float = 60.0) -> dict[str, Any]:
    """CPU time the daemon spends over `seconds` with nothing to do but stay fresh."""
    with fleet(profiles) as daemon:
        time.sleep(2.0)  # let start-up settle
        before = daemon.cpu_seconds()
        time.sleep(seconds)
        spent = daemon.cpu_seconds() - before
    return {
        "profiles": profiles,
        "seconds": seconds,
        "cpu_seconds": spent,
        "cpu_percent": spent / seconds * 100,
    }


def restore(profiles: int = 10_000, bound: int = 4, latency: float = 0.002) -> dict[str, Any]:
    """Restart with every session overdue: time until all are fresh, and the most
    refreshes the emulator saw in flight at once (never above `bound`)."""
    settings: dict[str, object] = {"max_concurrent_refreshes": bound, "startup_spread": 10}
    with fleet(profiles, due=True, broker=settings, start=False) as running:
        running.emulator.control("DELETE", "stats")
        # The emulator answers in microseconds, so refreshes would rarely overlap and
        # the bound would go untested: give each refresh a few milliseconds.
        running.emulator.control(
            "POST", "faults", {"kind": "latency", "seconds": latency, "match": "GET /api"}
        )
        started = time.monotonic()
        running.start()
        ready = time.monotonic() - started
        while True:
            states = call(running.socket, op="status", timeout=60)["profiles"]
            fresh = sum(1 for p in states if p["refreshes"] >= 1 and p["state"] == "active")
            if fresh == profiles:
                break
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        stats = running.emulator.control("GET", "stats")
        rss = running.rss_mib()
    return {
        "profiles": profiles,
        "bound": bound,
        "startup_s": ready,
        "all_fresh_s": elapsed,
        "refreshes": stats["counts"].get("GET /login", 0),
        "peak_in_flight": stats["peak_in_flight"],
        "emulator_latency_s": latency,
        "rss_mib": rss,
    }
