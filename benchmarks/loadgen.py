"""Closed-loop load generator for length-prefixed request/response Unix-socket servers.

Wire format (both ssh-agent and geins-broker): a 4-byte unsigned big-endian length N
followed by N bytes of body.  The generator takes one pre-encoded request *frame*
(length prefix included) and, on every connection, repeatedly writes it and reads
exactly one complete response frame (partial reads and multi-recv bodies handled).

Load model
----------
* ``connections`` (C) client connections in total, each with exactly one request in
  flight (closed loop), spread as evenly as possible over ``workers`` (P) separate
  processes (``multiprocessing`` with the ``spawn`` start method, so it is safe to call
  from a threaded or trio-using parent).
* Each worker drives its connections with non-blocking sockets and ``select.epoll``
  (level-triggered).  A worker that owns a single connection uses a plain blocking
  send/recv loop instead (the C=1 case).  No asyncio/trio on the client side: the
  per-request client cost is small and identical for every server under test.
* All workers connect first, report ready, and then start at one shared instant
  chosen by the parent (``time.perf_counter_ns`` is ``CLOCK_MONOTONIC`` on Linux, so
  timestamps are comparable across processes).  A warm-up period follows, then the
  measured window.  Only requests *completing* inside the window are counted; their
  latency (write start -> complete response, in ns) goes into an ``array('q')``.
* The parent samples CPU time (``/proc/PID/stat``) of the workers and, if given, of
  the server process over the measured window, so a report shows who was the
  bottleneck (``server_cpu`` / ``client_cpu`` in cores; the box has 2).

Choice of P (default 1): the box has 2 cores and both servers measured here are
single-threaded, so the fair split is one core for the server and one for the load.
One Python epoll worker costs about 4.5 us of CPU per request and drives ~200k req/s;
measured against ssh-agent (C=8/64/512) P=1 gave 155k/198k/217k req/s, P=2
112k/195k/198k, P=3 91k/143k/166k, P=4 76k/118k/146k: every extra process just
competes with the server for the same two cores.  Against the trio echo server
(~25 us/request, server-bound) P made no difference beyond noise.  On a machine with
more cores raise ``--workers`` until req/s stops growing.

CLI examples::

    python benchmarks/loadgen.py --socket $SSH_AUTH_SOCK --ssh-agent --connections 64
    python benchmarks/loadgen.py --start-ssh-agent key --connections 1 8 64 512 --repeat 2
    python benchmarks/loadgen.py --socket /run/user/1000/geins-broker.sock --broker-token
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12

RECV_SIZE = 65536
_MAX_FRAME = 16 * 1024 * 1024
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def frame(body: bytes) -> bytes:
    """Length-prefix ``body`` (4-byte big-endian)."""
    return len(body).to_bytes(4, "big") + body


def ssh_agent_request() -> bytes:
    """The SSH2_AGENTC_REQUEST_IDENTITIES frame: b'\\0\\0\\0\\x01\\x0b'."""
    return frame(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))


def broker_token_request(request_id: int = 1) -> bytes:
    """The geins-broker ``token`` request frame (msgpack map)."""
    import msgpack

    return frame(msgpack.packb({"id": request_id, "op": "token"}))


# --------------------------------------------------------------------------- helpers


def raise_fd_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to at least ``needed`` (capped at the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


def _cpu_seconds(pid: int) -> float | None:
    """utime+stime of ``pid`` (all threads) in seconds, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying while the server's accept backlog is full.

    A non-blocking AF_UNIX connect() fails with EAGAIN (not EINPROGRESS) when the
    listener's backlog is full (ssh-agent listens with backlog 128), so opening 512
    connections at once needs a retry loop.
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        while True:
            try:
                sock.connect(path)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"connect({path}): backlog full for {timeout} s") from None
                time.sleep(0.001)
            else:
                return sock
    except BaseException:
        sock.close()
        raise


def _sleep_until(t_ns: int) -> None:
    while True:
        left = t_ns - time.perf_counter_ns()
        if left <= 0:
            return
        time.sleep(min(left / 1e9, 0.05))


def _expected_ok(body_prefix: bytes | bytearray, expect: bytes | None) -> bool:
    return expect is None or bytes(body_prefix) == expect


# --------------------------------------------------------------------------- worker


@dataclass
class _WorkerResult:
    completed: int = 0  # responses completed inside the measured window
    completed_total: int = 0  # including warm-up
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: bytes = b""  # array('q') of ns, measured window only

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


@dataclass(frozen=True)
class _Job:
    path: str
    request: bytes
    expect: bytes | None
    t_measure: int  # perf_counter_ns at which the measured window opens
    t_end: int  # ... and closes


def _recv_frame(sock: socket.socket) -> bytes:
    """Read exactly one length-prefixed frame from a blocking socket."""
    data = sock.recv(RECV_SIZE)
    if len(data) >= 4 and len(data) == 4 + int.from_bytes(data[:4], "big"):
        return data  # fast path: the whole frame in one recv
    if not data:
        raise ConnectionError("EOF")
    buf = bytearray(data)
    if len(buf) < 4:
        buf += _recv_exactly(sock, 4 - len(buf))
    need = 4 + int.from_bytes(buf[:4], "big")
    if need > _MAX_FRAME:
        raise ValueError(f"frame too large: {need}")
    if len(buf) < need:
        buf += _recv_exactly(sock, need - len(buf))
    if len(buf) != need:
        raise ValueError("extra bytes after response frame")
    return bytes(buf)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError("EOF mid-frame")
        buf += data
    return bytes(buf)


def _run_blocking(job: _Job, sock: socket.socket, res: _WorkerResult) -> array[int]:
    """One connection, blocking I/O (SO_RCVTIMEO guards against a stalled server)."""
    lat = array("q")
    append = lat.append
    pc = time.perf_counter_ns
    request, expect, t_measure, t_end = job.request, job.expect, job.t_measure, job.t_end
    nexp = 0 if expect is None else len(expect)
    rcvtimeo = (2).to_bytes(8, sys.byteorder) + (0).to_bytes(8, sys.byteorder)

    def prepare(s: socket.socket) -> socket.socket:
        s.setblocking(True)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, rcvtimeo)
        return s

    prepare(sock)
    while True:
        t0 = pc()
        if t0 >= t_end:
            break
        try:
            sock.sendall(request)
            data = _recv_frame(sock)
        except (OSError, ValueError) as exc:
            res.error(repr(exc))
            sock.close()
            if pc() >= t_end:
                return lat
            try:
                sock = prepare(_connect(job.path))
            except OSError as exc2:
                res.error(f"reconnect: {exc2!r}")
                return lat
            continue
        t1 = pc()
        res.completed_total += 1
        if nexp and data[4 : 4 + nexp] != expect:
            res.error(f"unexpected response {data[:16].hex()}")
        elif t_measure <= t1 < t_end:
            res.completed += 1
            append(t1 - t0)
    sock.close()
    return lat


# The per-request path is deliberately kept inline in one function (no helper calls,
# locals bound once): in Python every call costs a noticeable share of the ~4 us budget.
def _run_epoll(job: _Job, socks: list[socket.socket], res: _WorkerResult) -> array[int]:  # noqa: PLR0912, PLR0915
    """Many connections, non-blocking sockets, level-triggered epoll."""
    lat = array("q")
    append = lat.append
    pc = time.perf_counter_ns
    path, request, expect, t_measure, t_end = (
        job.path,
        job.request,
        job.expect,
        job.t_measure,
        job.t_end,
    )
    nexp = 0 if expect is None else len(expect)
    reqlen = len(request)
    ep = select.epoll(max(1, len(socks)))
    by_fd: dict[int, socket.socket] = {}
    sent_at: dict[int, int] = {}
    partial: dict[int, bytearray] = {}  # fd -> incomplete response bytes
    unsent: dict[int, memoryview] = {}  # fd -> request bytes not yet written

    def add(s: socket.socket) -> None:
        s.setblocking(False)
        fd = s.fileno()
        by_fd[fd] = s
        ep.register(fd, _EPOLLIN)

    def drop(fd: int, why: str) -> None:
        res.error(why)
        s = by_fd.pop(fd)
        ep.unregister(fd)
        s.close()
        partial.pop(fd, None)
        unsent.pop(fd, None)
        sent_at.pop(fd, None)
        if pc() < t_end:
            try:
                ns = _connect(path)
            except OSError as exc:
                res.error(f"reconnect: {exc!r}")
                return
            add(ns)
            issue(ns.fileno())

    def issue(fd: int) -> None:
        sent_at[fd] = pc()
        try:
            n = by_fd[fd].send(request)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            drop(fd, f"send: {exc!r}")
            return
        if n != reqlen:
            unsent[fd] = memoryview(request)[n:]
            ep.modify(fd, _EPOLLIN | _EPOLLOUT)

    for s in socks:
        add(s)
    for fd in list(by_fd):
        issue(fd)

    while by_fd:
        now = pc()
        if now >= t_end:
            break
        events = ep.poll(min(0.1, (t_end - now) / 1e9))
        for fd, ev in events:
            sock = by_fd.get(fd)
            if sock is None:
                continue
            if ev & _EPOLLOUT and fd in unsent:
                try:
                    n = sock.send(unsent[fd])
                except BlockingIOError:
                    n = 0
                except OSError as exc:
                    drop(fd, f"send: {exc!r}")
                    continue
                rest = unsent[fd][n:]
                if rest:
                    unsent[fd] = rest
                else:
                    del unsent[fd]
                    ep.modify(fd, _EPOLLIN)
            if not ev & ~_EPOLLOUT:
                continue
            try:
                data = sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                drop(fd, f"recv: {exc!r}")
                continue
            if not data:
                drop(fd, "EOF")
                continue
            buf = partial.pop(fd, None)
            if buf is None:
                if len(data) >= 4 and len(data) == 4 + int.from_bytes(data[:4], "big"):
                    # Fast path: the whole frame arrived in one recv.
                    body_prefix: bytes | bytearray = data[4 : 4 + nexp]
                else:
                    buf = bytearray(data)
            else:
                buf += data
            if buf is not None:
                if len(buf) < 4:
                    partial[fd] = buf
                    continue
                need = 4 + int.from_bytes(buf[:4], "big")
                if need > _MAX_FRAME:
                    drop(fd, f"frame too large: {need}")
                    continue
                if len(buf) < need:
                    partial[fd] = buf
                    continue
                if len(buf) > need:
                    drop(fd, "extra bytes after response frame")
                    continue
                body_prefix = buf[4 : 4 + nexp]
            t1 = pc()
            res.completed_total += 1
            if nexp and not _expected_ok(body_prefix, expect):
                res.error(f"unexpected response {bytes(data[:16]).hex()}")
            elif t_measure <= t1 < t_end:
                res.completed += 1
                append(t1 - sent_at[fd])
            if t1 < t_end:
                issue(fd)
    for s in by_fd.values():
        s.close()
    ep.close()
    return lat


def _worker_main(conn: Any, path: str, request: bytes, nconn: int, expect: bytes | None) -> None:
    res = _WorkerResult()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C
    raise_fd_limit(nconn + 64)
    socks: list[socket.socket] = []
    try:
        for _ in range(nconn):
            socks.append(_connect(path))
    except OSError as exc:
        for s in socks:
            s.close()
        conn.send(("error", f"connect #{len(socks) + 1}: {exc!r}"))
        return
    conn.send(("ready", None))
    msg = conn.recv()
    if msg is None:
        return
    t_start, t_measure, t_end = msg
    job = _Job(path, request, expect, t_measure, t_end)
    _sleep_until(t_start)
    lat = _run_blocking(job, socks[0], res) if nconn == 1 else _run_epoll(job, socks, res)
    res.latencies = lat.tobytes()
    conn.send(("done", res))


# --------------------------------------------------------------------------- driver


def _percentile(sorted_vals: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (0 if empty)."""
    if not sorted_vals:
        return 0
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q * len(sorted_vals)) - 1))
    return sorted_vals[k]


def _start_workers(
    socket_path: str, request: bytes, share: list[int], expect: bytes | None
) -> tuple[list[Any], list[Any]]:
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    pipes: list[Any] = []
    for n in share:
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(
            target=_worker_main,
            args=(child_end, socket_path, request, n, expect),
            daemon=True,
        )
        p.start()
        child_end.close()
        procs.append(p)
        pipes.append(parent_end)
    return procs, pipes


def _wait_ready(pipes: list[Any]) -> None:
    failures = []
    for pipe in pipes:
        if not pipe.poll(60):
            failures.append("worker did not get ready within 60 s")
            continue
        kind, detail = pipe.recv()
        if kind != "ready":
            failures.append(detail)
    if failures:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        raise RuntimeError(f"load generator setup failed: {failures}")


def _cpu_delta(pids: list[int], t0: int, t1: int) -> list[float | None]:
    """CPU seconds each pid used between perf_counter_ns instants t0 and t1."""
    _sleep_until(t0)
    before = [_cpu_seconds(pid) for pid in pids]
    _sleep_until(t1)
    after = [_cpu_seconds(pid) for pid in pids]
    return [None if a is None or b is None else b - a for a, b in zip(before, after, strict=True)]


def _us(ns: float) -> float:
    return round(ns / 1000, 1)


def _summarize(results: list[_WorkerResult], window: float) -> dict[str, Any]:
    lat = array("q")
    for r in results:
        lat.frombytes(r.latencies)
    vals = sorted(lat)
    completed = sum(r.completed for r in results)
    return {
        "requests": completed,
        "rps": round(completed / window, 1),
        "p50_us": _us(_percentile(vals, 0.50)),
        "p90_us": _us(_percentile(vals, 0.90)),
        "p99_us": _us(_percentile(vals, 0.99)),
        "max_us": _us(vals[-1]) if vals else 0.0,
        "mean_us": _us(sum(vals) / len(vals)) if vals else 0.0,
        "errors": sum(r.errors for r in results),
        "error_samples": [e for r in results for e in r.error_samples][:5],
        "per_worker_requests": [r.completed for r in results],
    }


def run_load(  # noqa: PLR0917 - positional signature is the documented API
    socket_path: str,
    request: bytes,
    connections: int,
    duration: float = 3.0,
    warmup: float = 0.5,
    workers: int | None = None,
    *,
    expect: bytes | None = None,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Drive ``connections`` closed-loop connections against ``socket_path``.

    ``request`` is a complete frame (length prefix included).  ``workers`` (P, load
    processes) defaults to 1; see the module docstring for why on a 2-core box.
    ``expect``, if given, must be the first bytes of every response *body* (e.g.
    ``b"\\x0c"`` for ssh-agent); mismatches count as errors.  ``server_pid`` enables
    the ``server_cpu`` figure.  Returns requests/s over the measured window, latency
    percentiles in microseconds, error counts, and CPU use (in cores) of the load
    processes and the server over the window.
    """
    if connections < 1:
        raise ValueError("connections must be >= 1")
    if len(request) < 4 or int.from_bytes(request[:4], "big") != len(request) - 4:
        raise ValueError("request must be one complete length-prefixed frame")
    nworkers = max(1, min(connections, workers or 1))
    raise_fd_limit(connections + 256)
    share = [connections // nworkers + (i < connections % nworkers) for i in range(nworkers)]

    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        procs, pipes = _start_workers(socket_path, request, share, expect)
        _wait_ready(pipes)
        t_start = time.perf_counter_ns() + 50_000_000
        t_measure = t_start + int(warmup * 1e9)
        t_end = t_measure + int(duration * 1e9)
        for pipe in pipes:
            pipe.send((t_start, t_measure, t_end))
        pids = [p.pid for p in procs] + ([server_pid] if server_pid else [])
        cpu = _cpu_delta(pids, t_measure, t_end)
        results: list[_WorkerResult] = []
        for pipe in pipes:
            if not pipe.poll(duration + 30):
                raise RuntimeError("worker did not report")
            results.append(pipe.recv()[1])
    finally:
        for pipe in pipes:
            pipe.close()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()

    window = (t_end - t_measure) / 1e9
    client_cpu = sum(c for c in cpu[: len(procs)] if c is not None)
    server_cpu = cpu[-1] if server_pid else None
    return {
        "connections": connections,
        "workers": nworkers,
        "duration": window,
        "warmup": warmup,
        **_summarize(results, window),
        "client_cpu": round(client_cpu / window, 2),
        "server_cpu": None if server_cpu is None else round(server_cpu / window, 2),
    }


# --------------------------------------------------------------------------- servers


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """Wait until ``path`` accepts a connection (or ``proc`` dies / timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        if os.path.exists(path):
            try:
                _connect(path, 1.0).close()
            except OSError:
                pass
            else:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not accepting connections after {timeout} s")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM ``proc`` (only this pid), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class SshAgent:
    socket_path: str
    proc: subprocess.Popen[bytes]
    keys: int
    tmpdir: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_ssh_agent(
    socket_path: str | None = None, *, with_key: bool | str = False, nofile: int | None = None
) -> SshAgent:
    """Start ``ssh-agent -D -a PATH`` (foreground) and wait until it listens.

    ``with_key`` generates a throwaway key and ``ssh-add``s it, so the identities
    answer is non-empty: True or "ed25519" (a 75-byte answer), or "rsa" (RSA-4096,
    a ~560-byte answer, close to the size of a Geins bearer token answer).  ``nofile`` sets the agent's RLIMIT_NOFILE (its
    only connection limit: it accepts while open fds < nofile - 10).
    """
    tmpdir = tempfile.mkdtemp(prefix="loadgen-agent-")
    path = socket_path or os.path.join(tmpdir, "agent.sock")

    def preexec() -> None:  # pragma: no cover - runs in the child
        if nofile is not None:
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    proc = subprocess.Popen(
        ["ssh-agent", "-D", "-a", path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=preexec if nofile is not None else None,  # noqa: PLW1509
    )
    agent = SshAgent(path, proc, 0, tmpdir)
    try:
        wait_for_socket(path, proc)
        if with_key:
            kind = "ed25519" if with_key is True else str(with_key)
            key = os.path.join(tmpdir, f"id_{kind}")
            size = ["-b", "4096"] if kind == "rsa" else []
            subprocess.run(
                ["ssh-keygen", "-q", "-t", kind, *size, "-N", "", "-C", "loadgen", "-f", key],
                check=True,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            subprocess.run(
                ["ssh-add", key],
                check=True,
                capture_output=True,
                env={**os.environ, "SSH_AUTH_SOCK": path},
            )
            agent.keys = 1
    except BaseException:
        agent.stop()
        raise
    return agent


@contextlib.contextmanager
def ssh_agent(with_key: bool | str = False, nofile: int | None = None) -> Iterator[SshAgent]:
    agent = start_ssh_agent(with_key=with_key, nofile=nofile)
    try:
        yield agent
    finally:
        agent.stop()


def probe_concurrent(path: str, request: bytes, n: int, timeout: float = 2.0) -> int:
    """Open ``n`` connections at once, send one request on each, count the answers.

    Tells whether a server serves ``n`` simultaneous clients: connections parked in
    the accept backlog connect fine but get no answer; once the backlog is full too,
    connect() keeps failing with EAGAIN and the connection counts as unanswered.
    """
    raise_fd_limit(n + 64)
    socks = []
    try:
        for _ in range(n):
            try:
                s = _connect(path, timeout)
            except TimeoutError:  # not accepting and backlog full: unanswered
                continue
            s.sendall(request)
            socks.append(s)
        answered = 0
        pending = {s.fileno(): s for s in socks}
        ep = select.epoll()
        for fd in pending:
            ep.register(fd, _EPOLLIN)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for fd, _ in ep.poll(0.05):
                s = pending.pop(fd)
                ep.unregister(fd)
                if s.recv(RECV_SIZE):
                    answered += 1
        ep.close()
        return answered
    finally:
        for s in socks:
            s.close()


# --------------------------------------------------------------------------- CLI


def _fmt_row(r: dict[str, Any]) -> str:
    srv = "-" if r["server_cpu"] is None else f"{r['server_cpu']:.2f}"
    return (
        f"{r['connections']:>5} {r['workers']:>2} {r['rps']:>10.0f} {r['p50_us']:>9.1f} "
        f"{r['p90_us']:>9.1f} {r['p99_us']:>9.1f} {r['max_us']:>10.1f} {r['errors']:>6} "
        f"{r['client_cpu']:>5.2f} {srv:>5}"
    )


HEADER = "    C  P      req/s   p50(us)   p90(us)   p99(us)    max(us)   errs  cCPU  sCPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", help="Unix socket of the server under test")
    req = ap.add_mutually_exclusive_group()
    req.add_argument("--request-hex", help="request frame, hex, length prefix included")
    req.add_argument("--ssh-agent", action="store_true", help="send SSH2_AGENTC_REQUEST_IDENTITIES")
    req.add_argument("--broker-token", action="store_true", help='send {"op": "token"}')
    ap.add_argument(
        "--start-ssh-agent",
        choices=["empty", "key"],
        help="start a private ssh-agent (no keys / one ed25519 key) and load it",
    )
    ap.add_argument("--connections", "-c", type=int, nargs="+", default=[64])
    ap.add_argument("--duration", "-d", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--workers", "-p", type=int, default=0, help="load processes (default 1)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--server-pid", type=int, help="pid of the server, for its CPU use")
    ap.add_argument("--expect-hex", help="required prefix of every response body, hex")
    ap.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = ap.parse_args(argv)

    agent = None
    if args.start_ssh_agent:
        agent = start_ssh_agent(with_key=args.start_ssh_agent == "key")
        args.socket, args.ssh_agent, args.server_pid = agent.socket_path, True, agent.pid
    if not args.socket:
        ap.error("--socket (or --start-ssh-agent) is required")

    expect = bytes.fromhex(args.expect_hex) if args.expect_hex else None
    if args.request_hex:
        request = bytes.fromhex(args.request_hex)
    elif args.broker_token:
        request = broker_token_request()
    elif args.ssh_agent:
        request = ssh_agent_request()
        expect = expect or bytes([SSH_AGENT_IDENTITIES_ANSWER])
    else:
        ap.error("one of --request-hex, --ssh-agent, --broker-token is required")

    try:
        if not args.json:
            print(HEADER)
        for _ in range(args.repeat):
            for c in args.connections:
                r = run_load(
                    args.socket,
                    request,
                    c,
                    args.duration,
                    args.warmup,
                    args.workers or None,
                    expect=expect,
                    server_pid=args.server_pid,
                )
                print(json.dumps(r) if args.json else _fmt_row(r), flush=True)
                if r["error_samples"] and not args.json:
                    print("      errors:", r["error_samples"], file=sys.stderr)
    finally:
        if agent is not None:
            agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
