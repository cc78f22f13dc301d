"""The one page-token codec: only tokens this deployment issued, to this caller, for this query, pass."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator

import pytest

from services.runtime import auth
from services.runtime.errors import InvalidArgument
from services.runtime.paging import PageTokens, fingerprint

KEY = b"k" * 32
QUERY = fingerprint("routines", "u1")


@pytest.fixture
def as_user() -> Iterator[None]:
    token = auth.set_principal(auth.Principal(user_id="u1", role="member", session_id="s", token_id="t"))
    yield
    auth.reset_principal(token)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_token_round_trips_for_its_caller_and_query(as_user: None) -> None:
    pages = PageTokens(KEY)
    token = pages.encode(QUERY, ["2026-01-01T00:00:00+00:00", "r1"])
    assert pages.decode(token, QUERY) == ["2026-01-01T00:00:00+00:00", "r1"]
    assert pages.decode("", QUERY) is None


def _forgeries(pages: PageTokens) -> list[str]:
    genuine = pages.encode(QUERY, ["2026-01-01T00:00:00+00:00", "r1"])
    body, mac = genuine.split(".")
    old_constant_key = hashlib.blake2b(b"[1]", key=b"fittracker.workout.page-token.v1", digest_size=12).digest()
    return [
        _b64(b"[1]"),                                     # a bare body, no MAC
        _b64(b"[1]") + "." + _b64(old_constant_key),      # minted with the key that was in the source
        _b64(b"\xff\xfe\xfd") + "." + mac,                # non-UTF-8 body under a real MAC
        "." + mac,                                        # empty body
        body + ".",                                       # empty MAC
        body + "." + _b64(b"x" * 16),                     # wrong MAC
        _b64(json.dumps({"q": QUERY, "k": [1e308]}).encode()) + "." + mac,  # body swapped under a MAC
        "not base64 at all!!",
        "é.é",
        genuine[:-2],                                     # truncated
        PageTokens(b"z" * 32).encode(QUERY, ["x", "y"]),  # another deployment's key
    ]


def test_forged_and_altered_tokens_are_invalid_argument_naming_the_field(as_user: None) -> None:
    pages = PageTokens(KEY)
    for forged in _forgeries(pages):
        with pytest.raises(InvalidArgument) as err:
            pages.decode(forged, QUERY)
        assert "page_token" in str(err.value.to_status()), forged


def test_a_token_is_bound_to_the_query_and_to_the_caller() -> None:
    pages = PageTokens(KEY)
    first = auth.set_principal(auth.Principal(user_id="u1", role="member", session_id="s", token_id="t"))
    token = pages.encode(QUERY, ["a", "b"])
    with pytest.raises(InvalidArgument):
        pages.decode(token, fingerprint("routines", "u1", "other filter"))
    auth.reset_principal(first)
    second = auth.set_principal(auth.Principal(user_id="u2", role="member", session_id="s", token_id="t"))
    try:
        with pytest.raises(InvalidArgument):
            pages.decode(token, QUERY)
    finally:
        auth.reset_principal(second)


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        PageTokens(b"short")
