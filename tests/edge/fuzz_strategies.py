"""Hypothesis strategies for any request message, built from its descriptor.

Every field type gets random values and the boundary values that break naive code: int64
extremes, NaN and infinities, empty and huge strings, invalid UTF-8 in bytes, enum numbers no
enum defines, Timestamps and Durations at and past the ends of their range (negative nanos
included), nested messages and repeated fields. String fields with a ``pattern`` rule are also
drawn from the pattern itself, so that many requests get past validation into the handlers;
resource names get the caller's own ``users/me`` prefix for the same reason.
"""

from __future__ import annotations

import re
from typing import Any

from buf.validate import validate_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

T = FieldDescriptor
INT_RANGES = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1), T.TYPE_SINT32: (-(2**31), 2**31 - 1), T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1), T.TYPE_SINT64: (-(2**63), 2**63 - 1), T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1), T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1), T.TYPE_FIXED64: (0, 2**64 - 1),
}
#: Seconds of a Timestamp: the ends of what it may hold (years 1 and 9999), past them, and ordinary times.
TIMESTAMP_SECONDS = [-62135596800, 253402300799, -62135596801, 253402300800, 10**13, -(10**13), 0, -1,
                     946684800, 1735689600, 4102444800]
DURATION_SECONDS = [0, 1, -1, 315576000000, -315576000000, 10**13, 86400, 3600]
NANOS = [0, 1, 999_999_999, -1, 1_000_000_000, -999_999_999, 2**31 - 1]
HUGE = "x" * 100_000
TRICKY_STRINGS = ["", " ", "\x00", "users/me", "users/", "../..", "%2F", "é" * 300, "😀", "a" * 1025, HUGE,
                  "NaN", "-1", "9" * 40, "users/me/sessions/x", "exercises/barbell-back-squat"]
MAX_DEPTH = 3
#: Plain text, without the lone surrogates a protobuf string cannot carry.
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=80)


def integers(kind: int) -> st.SearchStrategy[int]:
    low, high = INT_RANGES[kind]
    return st.one_of(st.sampled_from(sorted({low, high, 0, 1, -1 if low < 0 else 2, low + 1, high - 1})),
                     st.integers(low, high))


def floats(kind: int) -> st.SearchStrategy[float]:
    single = kind == T.TYPE_FLOAT
    edges = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 3.4e38 if single else 1e308, -1e-300]
    return st.one_of(st.sampled_from(edges), st.floats(width=32 if single else 64, allow_nan=True, allow_infinity=True))


def pattern_strings(pattern: str) -> st.SearchStrategy[str] | None:
    """Strings matching a contract's RE2 pattern, with ``users/<id>`` turned to the caller's ``users/me``."""
    try:
        re.compile(pattern)
    except re.error:
        return None
    matching = st.from_regex(pattern, fullmatch=True).filter(lambda s: "\n" not in s)
    return matching.map(lambda s: re.sub(r"^users/[^/]+", "users/me", s)) | matching


def strings(field: FieldDescriptor) -> st.SearchStrategy[str]:
    options: list[st.SearchStrategy[str]] = [st.sampled_from(TRICKY_STRINGS), TEXT]
    rules = field.GetOptions().Extensions[validate_pb2.field]
    if rules.string.pattern:
        from_pattern = pattern_strings(rules.string.pattern)
        if from_pattern is not None:
            options = [from_pattern, from_pattern, *options]  # mostly valid, to get into the handlers
    if field.name == "email":
        options.append(st.emails().map(str))
    return st.one_of(*options)


def enums(field: FieldDescriptor) -> st.SearchStrategy[int]:
    assert field.enum_type is not None
    defined = sorted(field.enum_type.values_by_number)
    return st.one_of(st.sampled_from(defined), st.sampled_from([max(defined) + 1, 99, -1, 2**31 - 1, -(2**31)]))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values of a non-message field (or of its items, when repeated)."""
    kind = field.type
    if kind in INT_RANGES:
        return integers(kind)
    if kind in (T.TYPE_FLOAT, T.TYPE_DOUBLE):
        return floats(kind)
    if kind == T.TYPE_BOOL:
        return st.booleans()
    if kind == T.TYPE_STRING:
        return strings(field)
    if kind == T.TYPE_BYTES:
        return st.one_of(st.sampled_from([b"", b"\xff\xfe\xfd", b"\xc3\x28", b"\x00" * 1000]), st.binary(max_size=64))
    if kind == T.TYPE_ENUM:
        return enums(field)
    raise AssertionError(f"no strategy for {field.full_name} of type {kind}")


def time_values(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    """A Timestamp or Duration at and past the ends of its range, or an ordinary one."""
    message_class: Any = message_factory.GetMessageClass(descriptor)  # a Timestamp or Duration class
    seconds = TIMESTAMP_SECONDS if descriptor.full_name.endswith("Timestamp") else DURATION_SECONDS
    return st.builds(
        lambda s, n: message_class(seconds=s, nanos=n),
        st.one_of(st.sampled_from(seconds), st.integers(0, 4_200_000_000)),
        st.one_of(st.sampled_from(NANOS), st.integers(0, 999_999_999)),
    )


def field_masks(descriptor: Descriptor) -> st.SearchStrategy[Message]:
    message_class: Any = message_factory.GetMessageClass(descriptor)  # FieldMask
    return st.lists(st.one_of(st.sampled_from(["display_name", "name", "a.b", "*", "", "set.reps"]), TEXT),
                    max_size=4).map(lambda paths: message_class(paths=paths))


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor`` with any subset of their fields set to hostile or plausible values."""
    name = descriptor.full_name
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        return time_values(descriptor)
    if name == "google.protobuf.FieldMask":
        return field_masks(descriptor)
    message_class = message_factory.GetMessageClass(descriptor)
    fields = [f for f in descriptor.fields if depth < MAX_DEPTH or f.message_type is None]
    if not fields:
        return st.just(message_class())
    values = {f.name: st.none() | field_values(f, depth) for f in fields}
    return st.fixed_dictionaries(values).map(lambda chosen: build(message_class, chosen))


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key = scalar(entry.fields_by_name["key"])
        value_field = entry.fields_by_name["value"]
        value = messages(value_field.message_type, depth + 1) if value_field.message_type else scalar(value_field)
        return st.dictionaries(key, value, max_size=4)
    single: st.SearchStrategy[Any] = messages(entry, depth + 1) if entry is not None else scalar(field)
    if field.is_repeated:
        many = st.lists(single, max_size=4)
        return many | st.lists(single, min_size=50, max_size=120) if depth == 0 else many
    return single


def build(message_class: type[Message], chosen: dict[str, Any]) -> Message:
    """A message with the chosen values; a value the runtime refuses (wrong oneof mix) is left out."""
    message = message_class()
    for name, value in chosen.items():
        if value is not None:
            try:
                assign(message, name, value)
            except (TypeError, ValueError):
                continue
    return message


def assign(message: Message, name: str, value: Any) -> None:
    """Set field ``name`` of ``message`` to ``value``: a message, a map, a list or a scalar."""
    target = getattr(message, name)
    if isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list) and value and isinstance(value[0], Message):
        for item in value:
            target.add().CopyFrom(item)
    elif isinstance(value, list):
        target.extend(value)
    else:
        setattr(message, name, value)
