"""Resource names (AIP-122) parsed by the patterns the contracts declare, and who may use them.

Every user-owned resource lives under "users/{user}"; "me" stands for the caller. ``owned``
parses a name, resolves "me", and lets the call through only for the owner or an admin; anyone
else gets NOT_FOUND naming what they asked for, so nobody learns which resources exist.
The contracts' rules (protovalidate patterns) already checked the shape of names in requests;
a name that still does not fit is INVALID_ARGUMENT naming its field.
"""

from __future__ import annotations

from services.runtime import auth
from services.runtime.errors import InvalidArgument, NotFound

USER_SEGMENT = "user"


class Pattern:
    """A resource pattern such as "users/{user}/sessions/{session}/sets/{set}"."""

    def __init__(self, text: str) -> None:
        """Parse names of the form ``text``."""
        self.text = text
        self._parts = tuple(text.split("/"))

    def parse(self, name: str, field_name: str = "name") -> dict[str, str]:
        """The variables of ``name`` by their names in the pattern; INVALID_ARGUMENT if it does not fit."""
        parts = name.split("/")
        values: dict[str, str] = {}
        if len(parts) == len(self._parts):
            for expected, part in zip(self._parts, parts, strict=True):
                if expected.startswith("{"):
                    if not part:
                        break
                    values[expected[1:-1]] = part
                elif expected != part:
                    break
            else:
                return values
        raise InvalidArgument.field(field_name, f"{name!r} is not a name of the form {self.text}")

    def owned(self, name: str, field_name: str = "name") -> tuple[str, dict[str, str]]:
        """(the owner's user id, the name's variables), if the caller may use the resource."""
        values = self.parse(name, field_name)
        user_id = auth.resolve_user_id(values[USER_SEGMENT])
        try:
            auth.require_owner(user_id)
        except NotFound:
            raise NotFound(f"{name} not found") from None
        return user_id, values

    def owner(self, name: str, field_name: str = "name") -> str:
        """The owner's user id of ``name``, if the caller may use it."""
        return self.owned(name, field_name)[0]


USER = Pattern("users/{user}")
