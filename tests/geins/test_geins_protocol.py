from __future__ import annotations

import pytest

from broker.geins.protocol import encode_uri_component, password_digest, retry_after_seconds


@pytest.mark.parametrize(
    ("password", "digest"),
    [
        ("password123", "l3PQUMDTn5UrBaN7jbYBXNIvl6IvLXZTaA3+OvM+XCj2+OSnA8g5M4XRHsVVKwH7"),
        ("", "YlF9kP0wUh3myKzvHI+BWeUGS7nccZAk5q45fw5vdYXOdVNcIkgaHzmiHTBOjOgc"),
    ],
)
def test_password_digest_matches_the_sdk(password: str, digest: str) -> None:
    assert password_digest(password) == digest


def test_digest_is_of_utf8() -> None:
    assert password_digest("lösenord") != password_digest("losenord")
    assert len(password_digest("lösenord")) == 64


@pytest.mark.parametrize(
    ("raw", "escaped"),
    [
        ("a+b/c=", "a%2Bb%2Fc%3D"),
        ("A-Z_a.z!~*'()09", "A-Z_a.z!~*'()09"),
        ("space here&x=1", "space%20here%26x%3D1"),
        ("å", "%C3%A5"),
    ],
)
def test_encode_uri_component_matches_javascript(raw: str, escaped: str) -> None:
    assert encode_uri_component(raw) == escaped


def test_retry_after_forms() -> None:
    assert retry_after_seconds("120", now=0.0) == 120.0
    assert retry_after_seconds(None, now=0.0) is None
    assert retry_after_seconds("soon", now=0.0) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412480.0) == 30.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412500.0) == 0.0


@pytest.mark.parametrize(
    "raw", ["9" * 400, "\u00b2", "Fri, 31 Dec 99999 23:59:59 GMT", "Wed, 21 Oct 2015 99:99:99 GMT"]
)
def test_retry_after_that_is_no_time_is_ignored(raw: str) -> None:
    """A lying upstream's Retry-After: a 400-digit value is float inf, and "²" would raise
    ValueError."""
    assert retry_after_seconds(raw, now=0.0) is None
