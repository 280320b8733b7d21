"""Fleet-mode helpers: a real redis-server, a cuttable TCP path to it, and a fleet of
real daemons sharing it and one emulator. Real processes and real time: every wait
here is short and bounded. (The rest of the shared helpers are in support.py.)"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.emulator.model.service import DEMO_PASSWORD, DEMO_USER
from geins_broker_client._sync.client import Client
from tests.support import (
    DaemonProcess,
    EmulatorProcess,
    free_port,
    wait_until,
    write_config,
)

#: A JWT in clear: a header and a payload, each base64url of a JSON object ("eyJ" is
#: `{"`). Sealed bytes are random and hold the three bytes "eyJ" about once in 16 MiB,
#: so it is the shape, not those three bytes, that says a bearer is there.
CLEAR_JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}")

REDIS_MISSING = (
    "redis-server is not installed: `apt-get install -y redis-server` (Debian's package; "
    "scripts/test installs it when run as root)"
)


class RedisServer:
    """redis-server on a loopback port of its own, in its own directory; `persist`
    turns on the append-only file (fsync always), so a restart keeps every commit."""

    def __init__(
        self,
        workdir: Path,
        *,
        persist: bool = False,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail(REDIS_MISSING)
        self.dir = workdir / "redis"
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.password = password
        #: (CA certificate, server certificate, server key): TLS only, on `port`.
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persist
            else ["--appendonly", "no"]
        )
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    str(self.dir),
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "warning",
                    *persistence,
                    *(["--requirepass", self.password] if self.password else []),
                    *self._tls_options(),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.ping, 10, "redis-server answers PING")

    def _tls_options(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = self.tls
        # The TLS port replaces the plain one; the plain one listens elsewhere, for
        # the test's own commands.
        self.plain_port = free_port()
        return [
            "--port", str(self.plain_port),
            "--tls-port", str(self.port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def ping(self) -> bool:
        try:
            return bool(self.command("PING") == "PONG")
        except OSError:
            return False

    def command(self, *args: str) -> Any:
        """One command over a fresh connection (RESP by hand: no client in the tests)."""
        port = self.plain_port if self.tls else self.port
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            stream = sock.makefile("rb")
            if self.password:
                sock.sendall(resp_command("AUTH", self.password))
                assert _read_reply(stream) == "OK"
            sock.sendall(resp_command(*args))
            return _read_reply(stream)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def scan_values(self) -> dict[str, bytes]:
        """Every key and its value(s), raw, for the no-secret-in-clear check."""
        values: dict[str, bytes] = {}
        for key in self.command("KEYS", "*"):
            kind = self.command("TYPE", key)
            if kind == "hash":
                flat = self.command("HGETALL", key)
                values[key] = b"\n".join(v.encode("latin-1") for v in flat)
            elif kind == "string":
                values[key] = self.command("GET", key).encode("latin-1")
        return values


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths[2].chmod(0o600)
    return paths


def resp_command(*args: str) -> bytes:
    """One Redis command in RESP, as redis-cli would send it."""
    return (f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)).encode()


def _read_reply(stream: Any) -> Any:
    line = stream.readline()
    kind, rest = line[:1], line[1:-2]
    if kind in (b"+", b"-"):
        return rest.decode("latin-1")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = stream.read(size + 2)[:-2]
        return data.decode("latin-1")
    if kind == b"*":
        return [_read_reply(stream) for _ in range(int(rest))]
    raise AssertionError(f"unexpected reply {line!r}")


class CuttableProxy:
    """A TCP relay in front of Redis for one node: `cut()` stops relaying (every byte
    either way is held back, as a partition would), `heal()` resumes."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.open = threading.Event()
        self.open.set()
        self._stop = False
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                thread = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._stop:
                data = src.recv(65536)
                if not data:
                    break
                self.open.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        self.open.clear()

    def heal(self) -> None:
        self.open.set()

    def close(self) -> None:
        self._stop = True
        self.open.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


def jwt_claims(bearer: str) -> dict[str, Any]:
    """The claims of an emulator bearer (a JWT), unverified: the test reads what the
    emulator wrote."""
    payload = bearer.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def jti_rotations(bearer: str) -> tuple[str, int]:
    """(family, rotations) from an emulator bearer's jti: the emulator counts each
    successful rotation of a session in it."""
    family, _, rotations = str(jwt_claims(bearer)["jti"]).partition(".")
    return family, int(rotations)


def refresh_requests(emulator: EmulatorProcess) -> int:
    """Refresh requests the emulator received (a refresh is `GET /login` with the
    refresh token), answered or refused alike."""
    return int(emulator.control("GET", "stats")["counts"].get("GET /login", 0))


class Fleet:
    """N daemons (nodes n0, n1, ...) sharing one Redis and one emulator."""

    def __init__(
        self,
        workdir: Path,
        emulator: EmulatorProcess,
        redis_url: str | Callable[[int], str],
        *,
        nodes: int = 3,
        profiles: tuple[str, ...] = ("default",),
        lease_ttl: float = 2.0,
        poll_interval: float = 0.5,
        refresh_at: float = 0.5,
        env: Callable[[int], dict[str, str]] | None = None,
        cluster: dict[str, Any] | None = None,
        apps: dict[str, dict[str, Any]] | None = None,
        command_timeout: float = 0.5,
    ) -> None:
        self.workdir = workdir
        self.emulator = emulator
        self.profiles = profiles
        self.key_file = workdir / "fleet.key"
        self.key_file.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        self.key_file.chmod(0o600)
        self.daemons: dict[int, DaemonProcess] = {}
        self.configs: dict[int, Path] = {}
        self._env = env
        for i in range(nodes):
            node_dir = workdir / f"n{i}"
            node_dir.mkdir()
            url = redis_url(i) if callable(redis_url) else redis_url
            config = write_config(
                node_dir / "config.toml",
                emulator.url,
                node_dir / "s",
                node_dir / "state",
                profiles=profiles,
                broker={"startup_spread": 0, "key_file": str(self.key_file)},
                profile={"refresh_at": refresh_at, "jitter": 0.05},
                apps=apps,
            )
            with config.open("a") as handle:
                handle.write(
                    "[cluster]\n"
                    f'url = "{url}"\n'
                    f'node = "n{i}"\n'
                    f"lease_ttl = {lease_ttl}\n"
                    f"poll_interval = {poll_interval}\n"
                    f"command_timeout = {command_timeout}\n"
                    + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (cluster or {}).items())
                )
            self.configs[i] = config
        try:
            for i in self.configs:
                self.start(i)
        except BaseException:
            self.close()  # the nodes already up do not outlive a fleet that failed
            raise

    def socket(self, i: int) -> Path:
        return self.workdir / f"n{i}" / "s"

    def start(self, i: int) -> DaemonProcess:
        env = self._env(i) if self._env else None
        self.daemons[i] = DaemonProcess(self.configs[i], self.workdir / f"n{i}", env)
        return self.daemons[i]

    def kill(self, i: int) -> None:
        self.daemons.pop(i).kill()  # SIGKILL

    def client(self, i: int) -> Client:
        return Client(str(self.socket(i)), timeout=10)

    def login_all(self, i: int = 0) -> None:
        with self.client(i) as client:
            for profile in self.profiles:
                client.login(DEMO_USER, DEMO_PASSWORD, profile=profile)

    def tokens(self, i: int) -> dict[str, str]:
        with self.client(i) as client:
            return {p: client.token(p).token for p in self.profiles}

    def status(self, i: int) -> list[dict[str, Any]]:
        from tests.support import call

        answer = call(self.socket(i), op="status")
        assert answer["ok"], answer
        return list(answer["profiles"])

    def close(self) -> None:
        for daemon in self.daemons.values():
            daemon.close()
        self.daemons.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- n{i}\n" + (self.workdir / f"n{i}" / "daemon.log").read_text(errors="replace")
            for i in self.configs
            if (self.workdir / f"n{i}" / "daemon.log").exists()
        )


def fleet_fixtures(token_ttl: float) -> tuple[Any, Any]:
    """The `redis` and `emulator` fixtures of a fleet test module: a fresh redis-server
    and an emulator process whose bearers live `token_ttl` seconds (the module's pace of
    rotation), each stopped after the test. A module binds them by name:
    `redis, emulator = fleet_fixtures(TOKEN_TTL)`."""

    @pytest.fixture
    def redis(short_tmp: Path) -> Iterator[RedisServer]:
        server = RedisServer(short_tmp)
        try:
            yield server
        finally:
            server.stop()

    @pytest.fixture
    def emulator(short_tmp: Path) -> Iterator[EmulatorProcess]:
        with fleet_env(short_tmp, token_ttl=token_ttl) as emu:
            yield emu

    return redis, emulator


@contextlib.contextmanager
def fleet_env(
    workdir: Path, *, token_ttl: float = 6.0, refresh_grace: float | None = None
) -> Iterator[EmulatorProcess]:
    args = ["--token-ttl", str(token_ttl)]
    if refresh_grace is not None:
        args += ["--refresh-grace", str(refresh_grace)]
    emulator = EmulatorProcess(*args)
    try:
        yield emulator
    finally:
        emulator.stop()


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            alive.append(pid)
    return alive
