"""Request validation from the protovalidate rules written in the contracts.

The rules live in proto/ (``buf.validate`` options); this module only runs them and turns the
violations into an INVALID_ARGUMENT whose message and BadRequest details name each field with
its proto path (``preferences.goals.weekly_workout_target``), the names JSON clients send too.
"""

from __future__ import annotations

from buf.validate import validate_pb2
from google.protobuf.message import Message
from protovalidate import Validator

from services.runtime.errors import InvalidArgument


def field_path(path: validate_pb2.FieldPath) -> str:
    """Render a protovalidate field path as ``a.b[2].c``."""
    parts: list[str] = []
    for element in path.elements:
        name = element.field_name
        subscript = element.WhichOneof("subscript")
        if subscript is not None:
            key = getattr(element, subscript)
            name += f"[{key!r}]" if subscript == "string_key" else f"[{key}]"
        parts.append(name)
    return ".".join(parts)


class RequestValidator:
    """Checks messages against their contract rules; one instance caches compiled rules."""

    def __init__(self) -> None:
        """Create the underlying validator (rules are compiled lazily per message type)."""
        self._validator = Validator()  # type: ignore[no-untyped-call]  # protovalidate 1.x is unannotated

    def check(self, message: Message) -> None:
        """Raise InvalidArgument listing every violated rule of ``message``."""
        violations = self._validator.collect_violations(message)
        if violations:
            raise InvalidArgument(
                [
                    (field_path(v.proto.field) or message.DESCRIPTOR.name, v.proto.message or v.proto.rule_id)
                    for v in violations
                ]
            )
