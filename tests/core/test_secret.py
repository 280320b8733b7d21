from __future__ import annotations

import pickle

import pytest

from broker.core.secret import Secret


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2")
    for text in (
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret:>20}",
        str([secret]),
    ):
        assert "hunter2" not in text
    assert secret.reveal() == "hunter2"


def test_secret_compares_by_value() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert len({Secret("a"), Secret("a")}) == 1
    assert not Secret("")


def test_secret_refuses_pickling_and_non_strings() -> None:
    with pytest.raises(TypeError):
        pickle.dumps(Secret("x"))
    with pytest.raises(TypeError):
        Secret(b"x")  # type: ignore[arg-type]
