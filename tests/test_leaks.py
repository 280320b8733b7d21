"""No password, digest, bearer or refresh token in a log line, a status, an error or a repr."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock

from broker.emulator.model.faults import Fault
from broker.emulator.model.service import (
    DEMO_PASSWORD,
    DEMO_USER,
    AuthService,
    Family,
)
from broker.emulator.model.values import HttpResponse
from broker.geins.protocol import password_digest
from broker.observe import log as broker_log
from geins_broker_client import BrokerError
from tests.support import Broker, DaemonProcess, EmulatorProcess, call, write_config

NEW_PASSWORD = "a-new-and-secret-password"
WRONG_PASSWORD = "a-wrong-password-guess"


@pytest.fixture
def issued(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every bearer and refresh token the emulator hands out during the test."""
    tokens: list[str] = []
    original = AuthService._tokens

    def keeping(self: AuthService, family: Family, refresh: str) -> HttpResponse:
        response = original(self, family, refresh)
        tokens.extend([json.loads(response.body)["token"], refresh])
        return response

    monkeypatch.setattr(AuthService, "_tokens", keeping)
    return tokens


@pytest.fixture
def log_text() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    broker_log.setup("debug", stream)
    yield stream
    logging.getLogger("broker").handlers.clear()


async def test_a_whole_session_leaks_nothing(
    autojump_clock: MockClock, broker: Broker, issued: list[str], log_text: io.StringIO
) -> None:
    seen: list[str] = []  # everything a client was told, apart from the token answers
    async with broker.client() as client:
        for attempt in (WRONG_PASSWORD, DEMO_PASSWORD):
            try:
                seen.append(repr(await client.login(DEMO_USER, attempt)))
            except BrokerError as exc:
                seen.append(repr(exc))
        seen.append(repr(await client.status()))
        await trio.sleep(2000)  # rotations
        broker.emulator.server.faults.add(Fault("status", status=503, times=3))
        await trio.sleep(700)  # failed refreshes, logged
        seen.append(repr(await client.refresh()))
        try:
            await client.change_password(WRONG_PASSWORD, NEW_PASSWORD)
        except BrokerError as exc:
            seen.append(repr(exc))
        seen.append(repr(await client.change_password(DEMO_PASSWORD, NEW_PASSWORD)))
        seen.append(repr(await client.user()))
        seen.append(repr(await client.token()))
        seen.append(
            repr(broker.profile())
            + repr(broker.profile().session)
            + repr(broker.profile().session.tokens)
        )
        seen.append(json.dumps([p._asdict() for p in (await client.status()).profiles]))
        await client.logout()
        broker.emulator.service.add_user(DEMO_USER + ".x", "unused")
        seen.append(repr(await client.register("second@example.com", NEW_PASSWORD)))
        seen.append(repr(await client.status()))
    secrets = _secrets(issued)
    logs = log_text.getvalue()
    assert "event=refreshed" in logs and "event=refresh_failed" in logs  # the log did run
    assert len(issued) >= 10
    for text in [logs, *seen]:
        for secret in secrets:
            assert secret not in text


def _secrets(issued: list[str]) -> list[str]:
    passwords = [DEMO_PASSWORD, NEW_PASSWORD, WRONG_PASSWORD]
    return [*passwords, *(password_digest(p) for p in passwords), *issued]


def test_the_daemons_own_log_holds_no_secret(short_tmp: Path) -> None:
    emulator = EmulatorProcess("--token-ttl", "2")
    sock = short_tmp / "b.sock"
    daemon = DaemonProcess(
        write_config(short_tmp / "c.toml", emulator.url, sock, short_tmp / "state"), short_tmp
    )
    tokens: list[str] = []
    try:
        assert (
            call(sock, op="login", username=DEMO_USER, password=WRONG_PASSWORD)["error"]["code"]
            == "invalid_credentials"
        )
        assert call(sock, op="login", username=DEMO_USER, password=DEMO_PASSWORD)["ok"]
        for _ in range(3):
            tokens.append(call(sock, op="token")["token"])
            trio.run(trio.sleep, 1.6)
        state = json.loads((short_tmp / "state" / "default.session.json").read_text())
        tokens.append(state["refresh_token"])
        answer: dict[str, Any] = call(
            sock, op="change_password", password=DEMO_PASSWORD, new_password=NEW_PASSWORD
        )
        assert answer["ok"]
        tokens.append(call(sock, op="token")["token"])
        status = json.dumps(call(sock, op="status"))
        assert call(sock, op="logout")["ok"]
    finally:
        assert daemon.stop() == 0
        emulator.stop()
    text = daemon.log() + status
    assert "event=refreshed" in text
    for secret in [*_secrets(tokens)]:
        assert secret not in text
