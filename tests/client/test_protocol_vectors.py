"""The Python client against docs/protocol-vectors.json, the wire both clients must speak.

The file is generated from this same codec (scripts/make_vectors.py; scripts/test checks
it is current), so these tests mostly guard the other direction: a change to the codec,
the request builders, the error families or the socket search that would leave the Node
client (clients/node/test/vectors.test.ts reads the same file) behind shows up here as a
changed vector, and `make_vectors.py --check` fails until the file is regenerated and both
clients agree again.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from geins_broker_client import calls, errors, paths, trust
from geins_broker_client.protocol import FrameDecoder, encode

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "protocol-vectors.json").read_text("utf-8")
)


def _ids(cases: list[dict[str, Any]], key: str) -> list[str]:
    return [f"{i}-{case[key]}" for i, case in enumerate(cases)]


@pytest.mark.parametrize("case", VECTORS["requests"], ids=_ids(VECTORS["requests"], "call"))
def test_requests_are_built_byte_for_byte(case: dict[str, Any]) -> None:
    call = getattr(calls, case["call"])(**case["args"])
    request_id, frame = calls.Exchange().request(call)
    assert frame.hex() == case["hex"]
    assert call.idempotent is case["idempotent"]
    assert FrameDecoder().feed(frame) == [case["message"]]
    assert request_id == case["message"]["id"]


@pytest.mark.parametrize("case", VECTORS["answers"], ids=_ids(VECTORS["answers"], "name"))
def test_answers_decode_to_their_meaning(case: dict[str, Any]) -> None:
    frame = bytes.fromhex(case["hex"])
    assert encode(case["message"]) == frame
    decoder = FrameDecoder(16 * 1024 * 1024)
    # Fed a byte at a time: a frame split across reads decodes the same.
    decoded = [m for i in range(len(frame)) for m in decoder.feed(frame[i : i + 1])]
    assert decoded == [case["message"]]
    assert decoder.error is None


@pytest.mark.parametrize("case", VECTORS["error_codes"], ids=_ids(VECTORS["error_codes"], "code"))
def test_every_error_code_has_its_family(case: dict[str, Any]) -> None:
    (message,) = FrameDecoder().feed(bytes.fromhex(case["hex"]))
    with pytest.raises(errors.BrokerError) as raised:
        calls.answer(calls.parse_nothing, message)
    assert type(raised.value).__name__ == case["family"]
    assert raised.value.code == case["code"]
    assert raised.value.message == case["message"]


def test_error_codes_cover_the_protocol() -> None:
    from geins_broker_client.protocol import Code

    assert [c["code"] for c in VECTORS["error_codes"]] == list(Code.ALL)


def _answer(name: str) -> dict[str, Any]:
    (case,) = [a for a in VECTORS["answers"] if a["name"] == name]
    message: dict[str, Any] = case["message"]
    return message


def test_session_answers_read_as_their_results() -> None:
    created = calls.answer(calls.parse_customer_session, _answer("session_login"))
    assert (created.app, created.remember, created.session_ends_at) == ("shop", True, 1800604800.0)
    assert created.handle not in repr(created)
    assert calls.answer(calls.parse_customer_session, _answer("session_login, no absolute end"))
    token = calls.answer(calls.parse_session_token, _answer("session_token"))
    assert token.token not in repr(token)
    assert calls.answer(calls.parse_session_info, _answer("session_info")).customer_type == "PERSON"
    assert calls.answer(calls.parse_expires_at, _answer("session_passwd")) == 1800000900.5
    assert calls.answer(calls.parse_nothing, _answer("session_logout")) is None
    listed = calls.answer(calls.parse_sessions, _answer("sessions"))
    assert [entry.session for entry in listed] == ["9f86d081", "2c26b46b"]
    assert calls.answer(calls.parse_ended, _answer("session_end")) == 3
    status = calls.answer(calls.parse_status, _answer("status with apps"))
    assert [(a.app, a.sessions, a.in_memory) for a in status.apps] == [("shop", 1200, 310)]
    assert calls.answer(calls.parse_status, _answer("status")).apps == ()


def test_rate_limited_carries_retry_after() -> None:
    with pytest.raises(errors.RateLimited) as raised:
        calls.answer(calls.parse_customer_session, _answer("rate_limited with retry_after"))
    assert raised.value.retry_after == 41.5


@pytest.mark.parametrize("case", VECTORS["bad_frames"], ids=_ids(VECTORS["bad_frames"], "name"))
def test_bad_frames_stop_the_decoder(case: dict[str, Any]) -> None:
    decoder = FrameDecoder(case["max_size"])
    good = encode({"id": 1, "ok": True})
    assert decoder.feed(good + bytes.fromhex(case["hex"]) + good) == [{"id": 1, "ok": True}]
    assert decoder.error is not None
    assert decoder.feed(good) == []


def test_watch_stream_decodes_in_any_split() -> None:
    watch = VECTORS["watch"]
    stream = bytes.fromhex(watch["stream"])
    for cut in range(len(stream)):
        decoder = FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == watch["events"]
    (request,) = FrameDecoder().feed(bytes.fromhex(watch["request"]))
    events = [calls.answer(calls.parse_watch_event, e) for e in watch["events"]]
    assert request["op"] == "watch"
    assert [e.event for e in events] == ["token", "token", "logged_out", "login_required"]
    assert events[1].token is not None
    assert events[1].token.expires_at == watch["events"][1]["expires_at"]


def _with_uid(value: Any) -> Any:
    uid = str(os.geteuid())
    if isinstance(value, str):
        return value.replace("{uid}", uid)
    if isinstance(value, list):
        return [_with_uid(v) for v in value]
    return {k: _with_uid(v) for k, v in value.items()}


@pytest.mark.parametrize("case", VECTORS["socket_paths"])
def test_socket_candidates(case: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    env = _with_uid(case["env"])
    assert paths.candidate_sockets(env) == _with_uid(case["candidates"])
    for name in ("GEINS_BROKER_SOCKET", "XDG_RUNTIME_DIR", "TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if "explicit" in case:
        assert paths.find_socket() == case["explicit"]
    assert paths.find_socket("/given/explicitly.sock") == "/given/explicitly.sock"


_FORMAT = {
    "directory": stat.S_IFDIR,
    "socket": stat.S_IFSOCK,
    "symlink": stat.S_IFLNK,
    "file": stat.S_IFREG,
}


def _stat_result(entry: dict[str, Any] | None) -> os.stat_result | None:
    if entry is None:
        return None
    mode = _FORMAT[entry["type"]] | entry["mode"]
    return os.stat_result((mode, 1, 1, 1, entry["uid"], entry["uid"], 0, 0, 0, 0))


def _python_verdict(case: dict[str, Any], trusted: frozenset[int]) -> bool:
    """Whether the Python client's trust rule (`geins_broker_client.trust`: an lstat
    result and the trusted uids in, a reason or None out) accepts the case's lstat
    results."""
    directory, sock = _stat_result(case["directory"]), _stat_result(case["socket"])
    if directory is None:
        return True
    if trust.directory_problem(directory, trusted) is not None:
        return False
    return sock is None or trust.socket_problem(sock, trusted) is None


@pytest.mark.parametrize(
    "case", VECTORS["trust"]["cases"], ids=_ids(VECTORS["trust"]["cases"], "name")
)
def test_socket_trust_rule(case: dict[str, Any]) -> None:
    trusted = frozenset(VECTORS["trust"]["trusted_uids"])
    assert _python_verdict(case, trusted) is case["accept"]
