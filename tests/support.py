"""What the tests share, other than fixtures (those are in conftest.py).

Two kinds of helper: real processes for the tests that need them (the emulator, the
daemon, a notify socket; real time, so every wait here is short and bounded), and the
daemon in-process against the in-process emulator under MockClock (`start_broker`,
`Broker`, `RawConnection`, `Fraction`).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import trio
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from broker.core.clock import TrioWallClock, WallClock
from broker.daemon import config as config_module
from broker.daemon.config import BrokerConfig
from broker.daemon.lifecycle import Daemon
from broker.emulator.app import Emulator
from broker.emulator.model import service as emulator_service
from broker.sessions.profile import Profile
from geins_broker_client.protocol import MAX_RESPONSE_SIZE, FrameDecoder, encode
from geins_broker_client.trio_client import TrioClient

GEINS_BROKER = [sys.executable, "-m", "broker"]
#: The emulator's demo account, which most tests log in as.
DEMO_USER = emulator_service.DEMO_USER
DEMO_PASSWORD = emulator_service.DEMO_PASSWORD
#: The checkout's root.
REPO = Path(__file__).resolve().parent.parent


def loaded_in_fresh_interpreter(code: str, watched: tuple[str, ...]) -> list[str]:
    """Run `code` (statements, lines allowed) in a fresh, isolated interpreter on this
    one's path, and say which of the `watched` top-level modules it left loaded (this
    interpreter has long loaded everything, so only a fresh one can tell what an import
    pulls in). An exception in `code` fails the call."""
    probe = "\n".join(
        [
            "import sys",
            f"sys.path[:0] = {sys.path!r}",
            code,
            f"print(' '.join(m for m in {watched!r} if m in sys.modules))",
        ]
    )
    # -I: no environment, no user site; the path is ours.
    return subprocess.run(
        [sys.executable, "-I", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """`check()`'s first truthy value, polled every `every` s in real time; an
    AssertionError naming `what` after `timeout` s. For processes, files and logs that
    change on their own: one bounded wait for every such test."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(every)


class EmulatorProcess:
    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [*GEINS_BROKER, "emulator", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line.startswith("listening on http://"), line
        self.url = line.removeprefix("listening on ")

    def control(self, method: str, action: str, body: Mapping[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - loopback, the test's own emulator
            f"{self.url}/_emulator/{action}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return json.loads(response.read())

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=5)
        finally:
            self.process.kill()
            for stream in (self.process.stdout, self.process.stderr):
                if stream:
                    stream.close()


def write_config(
    path: Path,
    emulator_url: str,
    socket_path: Path,
    state_dir: Path,
    profiles: tuple[str, ...] = ("default",),
    broker: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    apps: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A config file; each of `apps` an `[apps.NAME]` on the emulator with its settings."""

    def toml_value(value: Any) -> str:
        return json.dumps(value)  # TOML strings, numbers, booleans and arrays read the same

    lines = [
        "[broker]",
        f"socket = {toml_value(str(socket_path))}",
        f"state_dir = {toml_value(str(state_dir))}",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in (broker or {}).items()]
    if metrics:
        lines += ["[metrics]", *(f"{k} = {toml_value(v)}" for k, v in metrics.items())]
    for name in profiles:
        lines += [
            f"[profiles.{name}]",
            'account = "demo"',
            'api_key = "demo-api-key"',
            f"auth_service_url = {toml_value(emulator_url)}",
            f"merchant_api_url = {toml_value(emulator_url)}",
        ]
        lines += [f"{k} = {toml_value(v)}" for k, v in (profile or {}).items()]
    for name, settings in (apps or {}).items():
        lines += [
            f"[apps.{name}]",
            'account = "demo"',
            'api_key = "demo-api-key"',
            f"auth_service_url = {toml_value(emulator_url)}",
            f"merchant_api_url = {toml_value(emulator_url)}",
        ]
        lines += [f"{k} = {toml_value(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class NotifySocket:
    """A datagram socket to set as $NOTIFY_SOCKET, collecting what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float = 10.0, *, prefix: bool = False) -> list[str]:
        """Every message until one holding `line` (e.g. "READY=1"), or a line starting
        with it when `prefix`."""
        deadline = time.monotonic() + timeout

        def seen() -> bool:
            lines = [x for m in self.messages for x in m.split("\n")]
            return any(x.startswith(line) if prefix else x == line for x in lines)

        while not seen():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line} within {timeout} s; got {self.messages}")
            self.sock.settimeout(remaining)
            self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def drain(self) -> list[str]:
        """Take in every message already sent, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.messages

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    def __init__(
        self,
        config: Path,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        *,
        wait_ready: bool = True,
        cwd: Path | None = None,
    ) -> None:
        self.notify = NotifySocket(workdir / f"notify-{time.monotonic_ns()}")
        self.log_path = workdir / "daemon.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        full_env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(env or {})}
        self.process = subprocess.Popen(
            [*GEINS_BROKER, "serve", "--config", str(config)],
            stdout=self._log,
            stderr=self._log,
            env=full_env,
            cwd=cwd,
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 15.0) -> None:
        try:
            self.notify.wait_for("READY=1", timeout)
        except TimeoutError:
            self.process.kill()
            raise AssertionError(f"daemon not ready:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP, then wait for the READY=1 that ends the reload (not an earlier one)."""
        count = len(self.notify.messages)
        self.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while not any("READY=1" in m for m in self.notify.messages[count:]):
            self.notify.wait_for("READY=1", deadline - time.monotonic())
            if not any("READY=1" in m for m in self.notify.messages[count:]):
                self.notify.messages.pop()  # an earlier READY=1; keep waiting

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
        self.close()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
            self.notify.drain()
            self.notify.close()


def call(socket_path: Path, timeout: float = 10.0, **message: Any) -> dict[str, Any]:
    """One request on a fresh blocking connection; the daemon's answer as a dict."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(encode({"id": 1, **message}))
        decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        while True:
            data = sock.recv(65536)
            assert data, "the daemon closed the connection"
            for answer in decoder.feed(data):
                return answer


@contextlib.contextmanager
def running(*processes: DaemonProcess | EmulatorProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if isinstance(process, DaemonProcess):
                process.close()
            else:
                process.stop()


# -- the daemon, in-process, against the in-process emulator (see conftest's fixtures) --


def fill(directory: Path) -> Path:
    """Fill the file system holding `directory`; delete the file returned to free it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def remount(mount: Path, mode: str) -> None:
    """Make a `tmpfs` read-only ("ro") or writable again ("rw")."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


class Broker:
    """A running daemon with its emulator, socket and state directory, for one test."""

    def __init__(self, daemon: Daemon, emulator: Emulator, socket: Path, state_dir: Path) -> None:
        self.daemon = daemon
        self.emulator = emulator
        self.socket = socket
        self.state_dir = state_dir

    def client(self, **kwargs: object) -> TrioClient:
        return TrioClient(self.socket, **kwargs)  # type: ignore[arg-type]

    def profile(self, name: str = "default") -> Profile:
        return self.daemon.profiles[name]

    async def login(self, profile: str = "default", remember: bool = False) -> None:
        async with self.client() as client:
            await client.login(DEMO_USER, DEMO_PASSWORD, profile=profile, remember=remember)


def broker_config(
    emulator: Emulator,
    socket: Path,
    state_dir: Path,
    *,
    profiles: tuple[str, ...] = ("default",),
    profile_settings: dict[str, object] | None = None,
    metrics: dict[str, object] | None = None,
    proxy: dict[str, object] | None = None,
    apps: Mapping[str, Mapping[str, object]] | None = None,
    **broker_settings: object,
) -> BrokerConfig:
    """A daemon's config on the emulator: `profiles`, and each of `apps` as an
    `[apps.NAME]` with its settings."""
    endpoint = emulator.endpoint()
    geins = {
        "account": endpoint.account,
        "api_key": endpoint.api_key,
        "auth_service_url": emulator.url,
        "merchant_api_url": emulator.url,
        "channel_id": "1|se",
        "language_id": "sv-SE",
        "market_id": "se",
    }
    data: dict[str, object] = {
        "metrics": metrics or {},
        "broker": {"socket": str(socket), "state_dir": str(state_dir), **broker_settings},
        "profiles": {name: {**geins, **(profile_settings or {})} for name in profiles},
        "apps": {name: {**geins, **settings} for name, settings in (apps or {}).items()},
    }
    if proxy is not None:
        data["proxy"] = proxy
    return config_module.parse(data, state_dir / "config.toml")


async def inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Blocking calls run in place: a worker thread would let MockClock jump ahead
    while it works. The subprocess tests cover the real threads."""
    await trio.lowlevel.checkpoint()
    return fn(*args)


async def start_broker(
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: WallClock,
    tmp: Path,
    *,
    rng: random.Random | None = None,
    state_dir: Path | None = None,
    offload: Callable[..., Any] = inline,
    **settings: object,
) -> Broker:
    """The daemon in this process. Blocking work runs in place (`inline`), as MockClock
    needs: a worker thread would let virtual time jump past it. A test on the real clock
    may pass `offload=trio.to_thread.run_sync`, as the daemon runs."""
    socket, state_dir = tmp / "broker.sock", state_dir or tmp / "state"
    config = broker_config(emulator, socket, state_dir, **settings)  # type: ignore[arg-type]
    daemon = Daemon(config, wall=wall, rng=rng or random.Random(7), offload=offload)
    await nursery.start(functools.partial(daemon.run, handle_signals=False))
    return Broker(daemon, emulator, socket, state_dir)


class Fraction(random.Random):
    """A random source whose `uniform(a, b)` always lands `at` of the way from a to b,
    so jitter and backoff give exact, predictable numbers."""

    def __init__(self, at: float) -> None:
        super().__init__(0)
        self.at = at

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.at


class RawConnection:
    """A client that speaks frames by hand: pipelining, bad frames, slow reading."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(MAX_RESPONSE_SIZE)
        self.pending: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, path: Path) -> RawConnection:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.connect(str(path))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.sock.send(data)

    async def request(self, **message: Any) -> None:
        await self.send(encode(message))

    async def receive(self) -> dict[str, Any] | None:
        """The next frame, or None at end of stream."""
        while not self.pending:
            data = await self.sock.recv(65536)
            if not data:
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    async def call(self, **message: Any) -> dict[str, Any]:
        await self.request(**message)
        answer = await self.receive()
        assert answer is not None
        return answer

    def close(self) -> None:
        self.sock.close()


# -- metrics -----------------------------------------------------------------------------


class Scrape:
    """An exposition parsed with prometheus_client's own parser: a value per sample."""

    def __init__(self, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {
            (s.name, frozenset(s.labels.items())): s.value
            for family in self.families.values()
            for s in family.samples
        }

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def __call__(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a counter that has not counted yet."""
        value = self.get(name, **labels)
        return 0.0 if value is None else value

    def labels(self, name: str) -> list[dict[str, str]]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


#: Profile settings for exact virtual times: no rotation jitter.
EXACT = {"jitter": 0}


async def exact_broker(
    nursery: trio.Nursery,
    emulator: Emulator,
    wall: TrioWallClock,
    tmp: Path,
    **settings: Any,
) -> Broker:
    """A broker whose rotation and backoff land on exact virtual times (no jitter; the
    random source always picks the top of its range)."""
    return await start_broker(
        nursery,
        emulator,
        wall,
        tmp,
        rng=Fraction(1.0),
        profile_settings=EXACT,
        **settings,
    )


def refreshes(emulator: Emulator) -> int:
    """Refreshes the emulator has answered (GET /login)."""
    return emulator.service.counts["GET /login"]


def free_port() -> int:
    """A loopback TCP port nobody listens on now (for a listener the test configures)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- other uids --------------------------------------------------------------------------

#: The uids the tests act as when another local user is the point: a stranger, and a
#: second unprivileged user (a reader the daemon may be told to serve).
NOBODY = 65534
READER = 65533


def as_uid(uid: int, *command: str, groups: str | None = None) -> list[str]:
    """`command` run as `uid` with that uid as its group, in the supplementary `groups`
    given (comma-separated gids), else in none. Needs root."""
    membership = "--clear-groups" if groups is None else f"--groups={groups}"
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", membership, *command]


def python_as(uid: int, *args: str, groups: str | None = None) -> list[str]:
    """A Python of `uid`'s running `args`, able to import `broker`, `geins_broker_client`
    and their third-party packages from wherever the checkout sits.

    Another uid cannot read a checkout under a directory it may not traverse (root's home
    is 0700), nor a venv whose interpreter lives there; and a venv whose target it cannot
    read may run some other Python without a word. So the code is a copy in a
    world-traversable temporary directory (`_for_other_uids`) and the interpreter one
    checked to run as another uid, named by its full path."""
    copy = _for_other_uids()
    return _python_command(uid, copy.python, copy.root / "python", *args, groups=groups)


def _python_command(
    uid: int, python: str, path: Path, *args: str, groups: str | None = None
) -> list[str]:
    # Through env(1): setpriv, when it may not execute a path, has been seen to run
    # another Python (and that one to report the path asked for as sys.executable);
    # env says "Permission denied" instead.
    environment = [f"PYTHONPATH={path}", "PYTHONDONTWRITEBYTECODE=1"]
    return as_uid(uid, "/usr/bin/env", *environment, python, "-s", *args, groups=groups)


def node_client_for_other_uids() -> Path:
    """The built Node client's entry point (dist/index.js), copied with its dependency
    where another uid can import it (see `python_as` for why a copy)."""
    node = _for_other_uids().root / "node"
    if not node.exists():
        built = REPO / "clients" / "node"
        assert (built / "dist" / "index.js").exists(), (
            "build the Node client first (scripts/test does)"
        )
        staging = node.with_name("node.partial")
        _copy_tree(built / "dist", staging / "dist")
        shutil.copy2(built / "package.json", staging / "package.json")
        for package in ("@msgpack/msgpack",):
            _copy_tree(built / "node_modules" / package, staging / "node_modules" / package)
        staging.rename(node)
    return node / "dist" / "index.js"


@dataclass(frozen=True)
class _OtherUidsCopy:
    root: Path
    python: str


@functools.cache
def _for_other_uids() -> _OtherUidsCopy:
    """Once per test run: the project's Python packages and their runtime dependencies
    (as installed here, the dev tools left out) under a fresh 0755 directory in the
    system's temporary directory, removed when the run ends."""
    root = Path(tempfile.mkdtemp(prefix="gb-others-", dir="/tmp"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    root.chmod(0o755)
    python = root / "python"
    _copy_tree(REPO / "broker", python / "broker")
    _copy_tree(REPO / "clients" / "python" / "geins_broker_client", python / "geins_broker_client")
    for distribution in _runtime_distributions():
        for file in distribution.files or ():
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # scripts outside site-packages; bytecode
            target = python / file
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _link_or_copy(Path(str(distribution.locate_file(file))), target)
    return _OtherUidsCopy(root, _interpreter_for_other_uids())


def _runtime_distributions() -> list[importlib.metadata.Distribution]:
    """The installed distributions the daemon and the client need: both pyproject.toml
    files' dependencies and theirs, transitively, markers evaluated here."""
    wanted: list[tuple[str, frozenset[str]]] = []
    for pyproject in (REPO / "pyproject.toml", REPO / "clients" / "python" / "pyproject.toml"):
        for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
            wanted.append((line, frozenset({""})))
    found: dict[str, importlib.metadata.Distribution] = {}
    while wanted:
        line, extras = wanted.pop()
        requirement = Requirement(line)
        if requirement.marker is not None and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in extras
        ):
            continue
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = importlib.metadata.distribution(requirement.name)
        asked = frozenset({"", *requirement.extras})
        wanted += [(line, asked) for line in found[name].requires or ()]
    return list(found.values())


def _interpreter_for_other_uids() -> str:
    """A Python of this one's version (the copied extension modules are built for it)
    that another uid can execute, by its resolved path: no venv in between."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [
        os.path.realpath(Path(sys.base_prefix) / "bin" / f"python{version}"),
        *(str(Path(d) / f"python{version}") for d in ("/usr/local/bin", "/usr/bin")),
    ]
    report = "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"
    for candidate in candidates:
        if not os.path.isfile(candidate):
            continue
        ran = subprocess.run(
            _python_command(NOBODY, candidate, Path("/nonexistent"), "-c", report),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        if ran.returncode == 0 and ran.stdout.strip() == version:
            return candidate
    raise AssertionError(f"no Python {version} another uid can run among {candidates}")


def _copy_tree(source: Path, target: Path) -> None:
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns("__pycache__"),
        copy_function=_link_or_copy,
        dirs_exist_ok=True,
    )
    for directory in [target, *(p for p in target.rglob("*") if p.is_dir())]:
        directory.chmod(0o755)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    """A hard link where the file system allows (the files are root's and not writable
    by others, so the link gives nothing away), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def build_wheel(directory: Path) -> Path:
    """The project's wheel, built into `directory` from a copy of the sources it is made
    of. Built in the checkout, setuptools would reuse the checkout's build/lib, whose
    stale modules go into every later wheel: a package the configuration left out would
    still ship from there."""
    source = Path(tempfile.mkdtemp(prefix="wheel-source-"))
    try:
        for name in ("pyproject.toml", "setup.py", "README.md"):
            shutil.copy2(REPO / name, source / name)
        # (the C hot path built in place for the checkout is built again for the wheel)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
        for tree in ("broker", "clients/python"):
            shutil.copytree(REPO / tree, source / tree, ignore=ignore)
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--wheel-dir",
                str(directory),
                str(source),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            raise RuntimeError(f"building the project's wheel failed:\n{built.stderr[-3000:]}")
    finally:
        shutil.rmtree(source, ignore_errors=True)
    (wheel,) = directory.glob("geins_broker-*.whl")
    return wheel
