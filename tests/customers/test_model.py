"""The pure parts: handles, the sealed record, lifetimes, the rate limit, the rules."""

from __future__ import annotations

import base64
import json
import random

import pytest

from broker.core.sealing import Key, Keyring
from broker.core.secret import Secret
from broker.customers.model import record as records
from broker.customers.model import refresh as rules
from broker.customers.model.errors import RecordUnreadable
from broker.customers.model.handles import (
    HANDLE_LENGTH,
    StoreKey,
    new_handle,
    session_key,
    well_formed,
)
from broker.customers.model.lifetime import EndReason, Lifetime
from broker.customers.model.ratelimit import LoginLimiter, LoginRates, Rate
from broker.customers.model.record import SessionRecord
from broker.geins import claims
from broker.policy.session import Saved, Session, Tokens


def test_handles_are_256_bits_url_and_cookie_safe() -> None:
    handles = {new_handle().reveal() for _ in range(1000)}
    assert len(handles) == 1000
    for handle in handles:
        assert len(handle) == HANDLE_LENGTH and well_formed(handle)
        assert set(handle) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        )
    assert not well_formed("a" * 42) and not well_formed("a" * 42 + ";")


def test_session_id_depends_on_app_and_store_key_and_key_on_neither_id() -> None:
    handle, key = new_handle(), StoreKey.generate()
    assert key.session_id("shop", handle) != key.session_id("outlet", handle)
    assert key.session_id("shop", handle) != StoreKey.generate().session_id("shop", handle)
    assert session_key("shop", handle) != key.session_id("shop", handle)
    assert key.customer_id("shop", "A@x.se") == key.customer_id("shop", "a@x.se")
    assert key.material.hex() not in repr(key)


def _record(generation: int = 3) -> SessionRecord:
    return SessionRecord(
        app="shop",
        username="a@x.se",
        remember=True,
        bearer=Secret("bearer-token"),
        refresh=Secret("refresh-token"),
        obtained_at=1.0,
        expires_at=901.0,
        session_ends_at=None,
        created_at=1.0,
        generation=generation,
        committed_at=2.0,
    )


def test_a_record_opens_only_with_its_handle_its_row_and_the_keyring() -> None:
    keyring, handle = Keyring(Key.generate()), new_handle()
    sid = StoreKey.generate().session_id("shop", handle)
    key = session_key("shop", handle)
    blob = records.seal(_record(), keyring, sid, key)
    assert b"refresh-token" not in blob and b"a@x.se" not in blob
    opened, stale = records.open_record(blob, keyring, "shop", sid, key)
    assert opened == _record() and opened.generation == 3 and not stale
    attempts = [
        (keyring, "shop", sid, session_key("shop", new_handle())),  # another handle
        (keyring, "shop", bytes(32), key),  # another row
        (keyring, "outlet", sid, key),  # another app
        (Keyring(Key.generate()), "shop", sid, key),  # another daemon key
    ]
    for ring, app, row, with_key in attempts:
        with pytest.raises(RecordUnreadable):
            records.open_record(blob, ring, app, row, with_key)
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(RecordUnreadable):
        records.open_record(bytes(flipped), keyring, "shop", sid, key)
    # The keyring alone opens the outer seal and finds ciphertext.
    inner = keyring.open("customer-session/shop/" + sid.hex(), blob).data
    assert b"refresh-token" not in inner and b"bearer-token" not in inner


def test_lifetime_ends() -> None:
    life = Lifetime(idle_remembered=100.0, idle_short=10.0)
    ended = life.ended
    assert ended(remember=False, last_used_at=0, session_ends_at=None, now=9.9) is None
    assert ended(remember=False, last_used_at=0, session_ends_at=None, now=10) is EndReason.IDLE
    assert ended(remember=True, last_used_at=0, session_ends_at=50, now=50) is EndReason.ABSOLUTE
    # A last use in the future (a clock stepped back) extends nothing.
    assert ended(remember=False, last_used_at=1e9, session_ends_at=None, now=5) is None
    assert life.ends_at(remember=True, last_used_at=0, session_ends_at=50) == 50


def test_login_limiter_buckets() -> None:
    limiter = LoginLimiter(LoginRates(per_username=Rate(0.5, 2), per_uid=Rate(10, 100)))
    assert limiter.attempt("A@x.se", 1, 0.0) == 0
    assert limiter.attempt("a@x.se", 2, 0.0) == 0
    assert limiter.attempt("a@x.se", 3, 0.0) == 2.0  # one token at 0.5/s
    assert limiter.attempt("a@x.se", 3, 2.0) == 0
    # A clock stepped back refills nothing.
    assert limiter.attempt("a@x.se", 3, -100.0) == pytest.approx(2.0)


def _jwt(payload: dict[str, int]) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256'})}.{part(payload)}.c2ln"


def test_demand_serves_exactly_as_session_does() -> None:
    bearer = Secret(_jwt({"exp": 2000, "iat": 1000}))
    tokens = Tokens(bearer, Secret("r"), claims.decode(bearer.reveal()), 1000, 2000, None)
    session = Session("p", rng=random.Random(0))
    session.restored(Saved(tokens, None, False, False, None, 0))
    for now in (999.0, 1500.0, 1999.0, 2000.0, 2500.0):
        for min_valid in (0.0, 1.0, 500.0, 1001.0):
            served = rules.on_demand(2000.0, now, min_valid, None) is rules.Demand.SERVE
            assert served == session.serves(now, min_valid), (now, min_valid)
    assert rules.on_demand(2000.0, 2001.0, 0, 2100.0) is rules.Demand.BACKING_OFF
    assert rules.on_demand(2000.0, 2101.0, 0, 2100.0) is rules.Demand.REFRESH


def test_a_bearer_is_packed_a_quarter_smaller_and_comes_back_exactly() -> None:
    from broker.customers.model import compact
    from broker.emulator.model import jwt

    token = jwt.mint(
        jwt.geins_claims(
            user_id="1000",
            username="customer@example.com",
            customer_type="PERSON",
            issued_at=1_800_000_000,
            expires_at=1_800_000_900,
            token_id="ab.0",
            issuer="https://auth-service.geins.io",
            audience="demo",
        ),
        b"k" * 32,
    )
    packed = compact.pack(token)
    assert isinstance(packed, bytes) and len(packed) <= len(token) * 0.77
    assert compact.unpack(packed) == token


@pytest.mark.parametrize(
    "token",
    [
        "",
        "a.b",
        "a.b.c.d",
        "eyJh.e30.sig=",  # padded
        "eyJh.e31.sig",  # stray bits in the last character: decodes, re-encodes otherwise
        "eyJh.e30.c2lnA",  # not a base64 length
        "eyJh.e3 0.sig",  # a character b64decode would skip
        "eyJh.e+0.sig",  # standard, not url-safe, alphabet
        "é.e30.sig",
    ],
)
def test_a_token_that_would_not_come_back_exactly_is_kept_as_it_is(token: str) -> None:
    from broker.customers.model import compact

    assert compact.pack(token) == token
    assert compact.unpack(compact.pack(token)) == token
