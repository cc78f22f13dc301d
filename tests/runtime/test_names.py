"""Resource names: parsed by the contracts' patterns, "me" resolved, other users' names NOT_FOUND."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.runtime import auth
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.names import Pattern

SET = Pattern("users/{user}/sessions/{session}/sets/{set}")


@pytest.fixture
def as_ada() -> Iterator[None]:
    token = auth.set_principal(auth.Principal(user_id="ada", role="member", session_id="s", token_id="t1"))
    yield
    auth.reset_principal(token)


def test_a_name_gives_its_variables() -> None:
    assert SET.parse("users/u1/sessions/s1/sets/x") == {"user": "u1", "session": "s1", "set": "x"}


@pytest.mark.parametrize("name", [
    "users/u1/sessions/s1", "users/u1/session/s1/sets/x", "users//sessions/s1/sets/x", "",
    "users/u1/sessions/s1/sets/x/y",
])
def test_a_name_of_another_shape_is_invalid_argument_naming_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        SET.parse(name, "parent")
    assert "parent" in str(err.value.to_status())


def test_me_is_the_caller_and_another_users_name_is_not_found(as_ada: None) -> None:
    assert SET.owned("users/me/sessions/s1/sets/x") == ("ada", {"user": "me", "session": "s1", "set": "x"})
    with pytest.raises(NotFound, match="users/bob/sessions/s1/sets/x not found"):
        SET.owned("users/bob/sessions/s1/sets/x")
