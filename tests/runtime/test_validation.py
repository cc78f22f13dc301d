"""The compiled request validator, checked against protovalidate as the reference implementation.

The main test is differential: for every request type of every service (found through the
generated descriptors, so new RPCs are covered without touching this file), and for a synthetic
contract using every standard rule the compiler supports, it generates seeded random messages —
valid ones, boundary values and invalid values for each rule — and requires the compiled
validator to report exactly protovalidate's violations (field path, rule id and message).

The one sanctioned difference: ``enum.defined_only`` on repeated items and map entries, which
protovalidate-python 1.2 skips and the compiled validator checks (as protovalidate's
specification and its other implementations do).
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import os
import random
import string
import struct
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import re2  # type: ignore[import-untyped]  # google-re2 ships no type information
from buf.validate import validate_pb2
from fittracker.ai.v1 import ai_service_pb2
from fittracker.notification.v1 import notification_pb2, notification_service_pb2
from fittracker.user.v1 import user_service_pb2
from fittracker.workout.v1 import workout_service_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from protovalidate import Validator

from services.runtime.errors import InvalidArgument
from services.runtime.validation import RequestValidator, Violation, field_path
from services.runtime.validation_regex import compile_search, translate
from services.runtime.validation_rules import EMAIL_PATTERN

GENERATED = Path(__file__).resolve().parents[2] / "clients" / "python" / "generated"
SEED = 20240611
#: Multiplies the number of generated messages; protovalidate needs milliseconds for each, so the
#: default keeps the suite fast. FITTRACKER_VALIDATION_FUZZ=20 makes a much deeper run.
FUZZ = float(os.environ.get("FITTRACKER_VALIDATION_FUZZ", "1"))
T = FieldDescriptor
FIELD = validate_pb2.field
IGNORE_IF_ZERO = validate_pb2.IGNORE_IF_ZERO_VALUE
IGNORE_ALWAYS = validate_pb2.IGNORE_ALWAYS


# --- discovery -----------------------------------------------------------------------------


def generated_modules() -> list[Any]:
    """Every generated fittracker ``*_pb2`` module."""
    return [
        importlib.import_module(".".join(path.relative_to(GENERATED).with_suffix("").parts))
        for path in sorted(GENERATED.glob("fittracker/**/*_pb2.py"))
    ]


def request_types() -> list[Descriptor]:
    """The request message of every RPC of every service."""
    found: dict[str, Descriptor] = {}
    for module in generated_modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[method.input_type.full_name] = method.input_type
    return [found[name] for name in sorted(found)]


def reachable(roots: Iterable[Descriptor]) -> dict[str, Descriptor]:
    """Every message type reachable from ``roots`` through fields, by full name."""
    seen: dict[str, Descriptor] = {}
    todo = list(roots)
    while todo:
        descriptor = todo.pop()
        if descriptor.full_name not in seen:
            seen[descriptor.full_name] = descriptor
            todo.extend(f.message_type for f in descriptor.fields if f.message_type is not None)
    return seen


def standalone_types() -> list[Descriptor]:
    """Top-level messages with rules that no RPC sends or returns (event envelopes, for one)."""
    in_rpcs = reachable(
        method.input_type if is_input else method.output_type
        for module in generated_modules()
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        for is_input in (True, False)
    )
    found = []
    for module in generated_modules():
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():
            if descriptor.full_name not in in_rpcs and has_rules(descriptor):
                found.append(descriptor)
    return found


def has_rules(descriptor: Descriptor) -> bool:
    """Whether ``descriptor`` or any type below it carries a buf.validate option."""
    for sub in reachable([descriptor]).values():
        if sub.GetOptions().HasExtension(validate_pb2.message):
            return True
        if any(o.GetOptions().HasExtension(validate_pb2.oneof) for o in sub.oneofs):
            return True
        if any(f.GetOptions().HasExtension(FIELD) for f in sub.fields):
            return True
    return False


def proto_patterns() -> list[str]:
    """Every ``string.pattern`` used in our contracts."""
    patterns: set[str] = set()
    for module in generated_modules():
        for descriptor in reachable(module.DESCRIPTOR.message_types_by_name.values()).values():
            for field in descriptor.fields:
                rules = field.GetOptions().Extensions[FIELD]
                for string_rules in (rules.string, rules.repeated.items.string, rules.map.values.string):
                    if string_rules.HasField("pattern"):
                        patterns.add(string_rules.pattern)
    return sorted(patterns)


# --- the oracle ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def oracle() -> Validator:
    return Validator()  # type: ignore[no-untyped-call]  # protovalidate 1.x is unannotated


def oracle_violations(oracle: Validator, message: Message) -> Counter[Violation]:
    return Counter(
        Violation(field_path(v.proto.field), v.proto.rule_id, v.proto.message)
        for v in oracle.collect_violations(message)
    )


def is_element_defined_only(violation: Violation) -> bool:
    """The sanctioned extra: defined_only on a repeated item or map entry (path ends in [..])."""
    return violation.rule_id == "enum.defined_only" and violation.field.endswith("]")


# --- seeded generation of messages ---------------------------------------------------------

INT_LIMITS = {
    T.TYPE_INT32: (-(2**31), 2**31 - 1),
    T.TYPE_SINT32: (-(2**31), 2**31 - 1),
    T.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    T.TYPE_INT64: (-(2**63), 2**63 - 1),
    T.TYPE_SINT64: (-(2**63), 2**63 - 1),
    T.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    T.TYPE_UINT32: (0, 2**32 - 1),
    T.TYPE_FIXED32: (0, 2**32 - 1),
    T.TYPE_UINT64: (0, 2**64 - 1),
    T.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOAT_TYPES = (T.TYPE_FLOAT, T.TYPE_DOUBLE)
GOOD_EMAILS = ["someone@example.com", "a.b+c@sub.example.co", "x@y", "first_last@a-b.example"]
BAD_EMAILS = [
    "plain", "a@", "@b.c", "a b@c.d", "a@-b.c", "a@b-.c", "a@b..c", "a@b.c\n", "ä@b.c", "a@" + "b" * 64 + ".c",
    "a@" + "b" * 63 + ".c", "<a@b.c>", "a@b_c.d",
]
JUNK_STRINGS = ["", "a", "ab", "abc", " ", "A b", "é", "日本語", "😀", "x" * 10, "users/", "\n", "a\n", "ünï/cödé"]
NUMBERS_ANYWHERE = [0, 1, -1, 2, 7, 100, 12345]
#: Sub-messages nest this deep at most: enough for every path in our contracts, and protovalidate
#: pays for every level.
MAX_DEPTH = 2
#: Values every field of a type gets as candidates, whatever its rules.
GENERIC_VALUES = frozenset([*JUNK_STRINGS, *NUMBERS_ANYWHERE])


class RegexSampler:
    """Random strings matching a pattern: an independent little generator for test inputs."""

    PRINTABLE = string.ascii_letters + string.digits + "-_./+@ "

    def __init__(self, pattern: str, rng: random.Random) -> None:
        self._text = pattern
        self._rng = rng
        self._pos = 0

    def sample(self) -> str:
        self._pos = 0
        return self._alternatives()

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _alternatives(self) -> str:
        options = [self._sequence()]
        while self._peek() == "|":
            self._pos += 1
            options.append(self._sequence())
        return self._rng.choice(options)

    def _sequence(self) -> str:
        parts: list[str] = []
        while self._peek() not in ("", "|", ")"):
            start = self._pos
            self._atom_text()  # a first pass finds where the atom ends
            low, high = self._quantifier()
            after = self._pos
            count = self._rng.randint(low, min(high, low + 6)) if self._rng.random() < 0.8 else high
            for _ in range(min(count, 200)):
                self._pos = start
                parts.append(self._atom_text())
            self._pos = after
        return "".join(parts)

    def _atom_text(self) -> str:
        char = self._text[self._pos]
        self._pos += 1
        if char in "^$":
            return ""
        if char == "(":
            if self._text.startswith("?:", self._pos):
                self._pos += 2
            text = self._alternatives()
            self._pos += 1  # ")"
            return text
        if char == "[":
            return self._rng.choice(self._class())
        if char == ".":
            return self._rng.choice(self.PRINTABLE)
        if char == "\\":
            escaped = self._text[self._pos]
            self._pos += 1
            classes = {"d": string.digits, "w": string.ascii_letters + string.digits + "_", "s": " \t"}
            return self._rng.choice(classes[escaped]) if escaped in classes else escaped
        return char

    def _class(self) -> str:
        negated = self._text[self._pos] == "^"
        if negated:
            self._pos += 1
        members: set[str] = set()
        first = True
        while first or self._text[self._pos] != "]":
            first = False
            char = self._text[self._pos]
            if char == "\\":
                char = self._text[self._pos + 1]
                self._pos += 1
            if self._text[self._pos + 1] == "-" and self._text[self._pos + 2] != "]":
                high = self._text[self._pos + 2]
                members.update(chr(c) for c in range(ord(char), ord(high) + 1))
                self._pos += 3
            else:
                members.add(char)
                self._pos += 1
        self._pos += 1
        if negated:
            return "".join(c for c in self.PRINTABLE + "é" if c not in members)
        return "".join(sorted(members))

    def _quantifier(self) -> tuple[int, int]:
        char = self._peek()
        if char in ("*", "+", "?"):
            self._pos += 1
            return {"*": (0, 8), "+": (1, 8), "?": (0, 1)}[char]
        if char == "{":
            end = self._text.index("}", self._pos)
            low, comma, high = self._text[self._pos + 1 : end].partition(",")
            self._pos = end + 1
            if not comma:
                return int(low), int(low)
            return int(low), int(high) if high else int(low) + 8
        return 1, 1


def string_fits(value: str, rules: validate_pb2.StringRules) -> bool:
    """A rough independent reading of the string rules, used only to steer generation."""
    checks = [
        not rules.HasField("min_len") or len(value) >= rules.min_len,
        not rules.HasField("max_len") or len(value) <= rules.max_len,
        not rules.HasField("len") or len(value) == rules.len,
        not rules.HasField("min_bytes") or len(value.encode()) >= rules.min_bytes,
        not rules.HasField("max_bytes") or len(value.encode()) <= rules.max_bytes,
        not rules.HasField("pattern") or re2.search(rules.pattern, value) is not None,
        not rules.HasField("prefix") or value.startswith(rules.prefix),
        not rules.HasField("suffix") or value.endswith(rules.suffix),
        not rules.HasField("contains") or rules.contains in value,
        not rules.HasField("not_contains") or rules.not_contains not in value,
        not rules.HasField("const") or value == rules.const,
        not getattr(rules, "in") or value in getattr(rules, "in"),
        value not in rules.not_in,
        not rules.email or re2.fullmatch(EMAIL_PATTERN, value) is not None,
        not rules.uuid or len(value) == 36,
        not rules.tuuid or len(value) == 32,
    ]
    return all(checks)


def number_fits(value: float, rules: Any) -> bool:
    """A rough independent reading of the numeric rules, used only to steer generation."""
    if isinstance(value, float) and math.isnan(value):
        return not any(rules.HasField(b) for b in ("gt", "gte", "lt", "lte", "const")) and not getattr(rules, "in")
    lower_ok = (not rules.HasField("gt") or value > rules.gt) and (not rules.HasField("gte") or value >= rules.gte)
    upper_ok = (not rules.HasField("lt") or value < rules.lt) and (not rules.HasField("lte") or value <= rules.lte)
    lower_set = rules.HasField("gt") or rules.HasField("gte")
    upper_set = rules.HasField("lt") or rules.HasField("lte")
    if lower_set and upper_set:
        low = rules.gt if rules.HasField("gt") else rules.gte
        high = rules.lt if rules.HasField("lt") else rules.lte
        in_range = (lower_ok and upper_ok) if high >= low else (lower_ok or upper_ok)
    else:
        in_range = lower_ok and upper_ok
    finite = not getattr(rules, "finite", False) or math.isfinite(value)
    members = getattr(rules, "in")
    return (
        in_range
        and finite
        and (not rules.HasField("const") or value == rules.const)
        and (not members or value in members)
        and value not in rules.not_in
    )


#: The rule kind of each well-known time type.
TIME_KINDS = {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}
NANOS = 1_000_000_000
#: Timestamps protovalidate-python can convert: years 1 to 9999.
FIRST_SECOND, LAST_SECOND = -62135596800, 253402300799


def time_kind(field: FieldDescriptor) -> str | None:
    """"timestamp" or "duration" for fields of those well-known types, else None."""
    return TIME_KINDS.get(field.message_type.full_name) if field.message_type is not None else None


def time_micros(value: Any) -> int:
    """A (seconds, nanos) pair or a Timestamp/Duration in microseconds, nanos floored as protovalidate does."""
    seconds, nanos = value if isinstance(value, tuple) else (value.seconds, value.nanos)
    return int(seconds) * 1_000_000 + int(nanos) // 1000


def time_pair(total_nanos: int, kind: str) -> tuple[int, int]:
    """(seconds, nanos) of nanoseconds: nanos in [0, 1e9) for timestamps, signed like seconds for durations."""
    if kind == "timestamp":
        return divmod(total_nanos, NANOS)
    seconds = abs(total_nanos) // NANOS * (1 if total_nanos >= 0 else -1)
    return seconds, total_nanos - seconds * NANOS


def time_message(field: FieldDescriptor, value: tuple[int, int]) -> Any:
    """The Timestamp or Duration message of a (seconds, nanos) candidate."""
    return (Timestamp if time_kind(field) == "timestamp" else Duration)(seconds=value[0], nanos=value[1])


def has_within(rules: Any) -> bool:
    return "within" in rules.DESCRIPTOR.fields_by_name and bool(rules.HasField("within"))


class MicrosRules:
    """Time rules seen in microseconds, so that number_fits can judge time candidates too."""

    def __init__(self, rules: Any) -> None:
        self._rules = rules

    def HasField(self, name: str) -> bool:  # noqa: N802  # the protobuf method it stands in for
        return bool(self._rules.HasField(name))

    def __getattr__(self, name: str) -> Any:
        if name in ("in", "not_in"):  # durations have them, timestamps not
            return [time_micros(item) for item in getattr(self._rules, name, [])]
        value = getattr(self._rules, name)
        return time_micros(value)


def time_fits(value: tuple[int, int], rules: Any) -> bool:
    """A rough independent reading of the timestamp/duration rules, used only to steer generation."""
    micros = time_micros(value)
    now = int(time.time() * 1_000_000)
    return (
        number_fits(micros, MicrosRules(rules))
        and not (getattr(rules, "lt_now", False) and micros > now)
        and not (getattr(rules, "gt_now", False) and micros < now)
        and not (has_within(rules) and abs(micros - now) > time_micros(rules.within))
    )


#: Candidate values of one field: (good, bad, bad ones derived from the field's rules).
Pools = tuple[list[Any], list[Any], list[Any]]
class Sampler:
    """Builds messages field by field from each field's rules: good values, boundaries, bad values."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._pools: dict[tuple[str, str], Pools] = {}
        self._synthetic: dict[str, set[str]] = {}

    def message(self, descriptor: Descriptor, bad: float) -> Message:
        """A message of ``descriptor`` whose fields break their rules with probability ``bad``."""
        message = message_factory.GetMessageClass(descriptor)()
        self._fill(message, descriptor, bad, depth=0)
        return message

    # Which oneofs are proto3 `optional` wrappers rather than real oneofs.
    def _synthetic_oneofs(self, descriptor: Descriptor) -> set[str]:
        if descriptor.full_name not in self._synthetic:
            proto = descriptor_pb2.DescriptorProto()
            descriptor.CopyToProto(proto)
            self._synthetic[descriptor.full_name] = {
                descriptor.oneofs[f.oneof_index].name for f in proto.field if f.proto3_optional
            }
        return self._synthetic[descriptor.full_name]

    def _fill(self, message: Message, descriptor: Descriptor, bad: float, depth: int) -> None:
        if descriptor.full_name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
            # In range: protovalidate-python cannot even convert out-of-range times (ValueError).
            message.seconds = self.rng.randrange(0, 4_000_000_000)  # type: ignore[attr-defined]  # both have it
            message.nanos = self.rng.randrange(0, 1_000_000_000)  # type: ignore[attr-defined]  # both have it
            return
        synthetic = self._synthetic_oneofs(descriptor)
        chosen: set[str] = set()
        for oneof in descriptor.oneofs:
            if oneof.name in synthetic:
                continue
            required = oneof.GetOptions().Extensions[validate_pb2.oneof].required
            leave_empty = self.rng.random() < (bad if required else 0.3)
            if not leave_empty:
                chosen.add(self.rng.choice(oneof.fields).name)
        for field in descriptor.fields:
            group = field.containing_oneof
            if group is not None and group.name not in synthetic and field.name not in chosen:
                continue
            self._fill_field(message, field, bad, depth, force=field.name in chosen)
        rules = descriptor.GetOptions().Extensions[validate_pb2.message]
        for rule in rules.oneof:
            self._shape_message_oneof(message, descriptor, list(rule.fields), rule.required, bad)

    def _shape_message_oneof(
        self, message: Message, descriptor: Descriptor, names: list[str], required: bool, bad: float
    ) -> None:
        wanted = self.rng.choice([0, 2]) if self.rng.random() < bad else self.rng.choice([1] if required else [0, 1])
        for name in names:
            message.ClearField(name)
        for name in self.rng.sample(names, min(wanted, len(names))):
            field = descriptor.fields_by_name[name]
            good, _, _ = self._pools_for(field, field.GetOptions().Extensions[FIELD], "field")
            non_zero = [v for v in good if v] or [1 if field.type not in (T.TYPE_STRING,) else "x"]
            if field.message_type is not None:
                getattr(message, name).SetInParent()
            elif field.is_repeated:
                getattr(message, name).append(self.rng.choice(non_zero))
            else:
                setattr(message, name, self.rng.choice(non_zero))

    def _fill_field(self, message: Message, field: FieldDescriptor, bad: float, depth: int, *, force: bool) -> None:
        rules = field.GetOptions().Extensions[FIELD]
        is_bad = self.rng.random() < bad
        name = field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            self._fill_map(getattr(message, name), field, rules, bad, depth, is_bad=is_bad)
        elif field.is_repeated:
            self._fill_list(getattr(message, name), field, rules, bad, depth, is_bad=is_bad)
        elif time_kind(field) is not None and rules.WhichOneof("type") == time_kind(field):
            if not force and not rules.required and self.rng.random() < 0.2:
                return  # left unset
            getattr(message, name).CopyFrom(time_message(field, self._pick(self.pools(field), bad=is_bad)))
        elif field.message_type is not None:
            skipped = not rules.required and self.rng.random() < 0.2
            if force or not ((is_bad and rules.required) or depth >= MAX_DEPTH or skipped):
                sub = getattr(message, name)
                sub.SetInParent()
                self._fill(sub, field.message_type, bad, depth + 1)
        else:
            if field.has_presence and not force and self.rng.random() < (0.5 if is_bad == rules.required else 0.15):
                return  # left unset
            pools = self._pools_for(field, rules, "field")
            zero = field.default_value
            # The zero value is the boundary most rules care about (required, *_empty, min_len).
            use_zero = is_bad and zero in pools[1] and self.rng.random() < 0.3
            setattr(message, name, zero if use_zero else self._pick(pools, bad=is_bad))

    def _fill_list(
        self, values: Any, field: FieldDescriptor, rules: validate_pb2.FieldRules, bad: float, depth: int,
        *, is_bad: bool,
    ) -> None:
        repeated = rules.repeated
        low = repeated.min_items
        high = repeated.max_items if repeated.HasField("max_items") else low + 4
        if is_bad and self.rng.random() < 0.5 and (repeated.HasField("max_items") or low > 0):
            count = self.rng.choice([c for c in (low - 1, high + 1, high + 2) if c >= 0])
        else:
            count = self.rng.randint(low, min(high, low + 4))
        count = 0 if rules.required and is_bad and self.rng.random() < 0.5 else count
        if field.message_type is not None:
            for _ in range(min(count, 3)):
                item = values.add()
                self._fill(item, field.message_type, bad, depth + 1)
            return
        pools = self._pools_for(field, repeated.items, "items")
        items = [self._pick(pools, bad=self.rng.random() < bad) for _ in range(count)]
        if repeated.unique and items and not is_bad:
            items = list(dict.fromkeys(items))
        elif repeated.unique and len(items) > 1 and is_bad:
            items[-1] = items[0]
        values.extend(items)

    def _fill_map(
        self, pairs: Any, field: FieldDescriptor, rules: validate_pb2.FieldRules, bad: float, depth: int,
        *, is_bad: bool,
    ) -> None:
        entry = field.message_type
        assert entry is not None
        map_rules = rules.map
        low = map_rules.min_pairs
        high = map_rules.max_pairs if map_rules.HasField("max_pairs") else low + 3
        if is_bad and self.rng.random() < 0.5 and (map_rules.HasField("max_pairs") or low > 0):
            count = self.rng.choice([c for c in (low - 1, high + 1) if c >= 0])
        else:
            count = self.rng.randint(low, min(high, low + 3))
        key_field = entry.fields_by_name["key"]
        key_pools = self._pools_for(key_field, map_rules.keys, "keys")
        value_field = entry.fields_by_name["value"]
        keys: dict[Any, None] = {}
        for attempt in range(count * 4):
            if len(keys) == count:
                break
            key = self._pick(key_pools, bad=self.rng.random() < bad)
            if attempt >= count * 2 and key_field.type != T.TYPE_BOOL:  # pools too small: invent keys
                key = f"key{attempt}" if key_field.type == T.TYPE_STRING else 1000 + attempt
            keys[key] = None
        for key in keys:
            if value_field.message_type is not None:
                self._fill(pairs[key], value_field.message_type, bad, depth + 1)
            else:
                value_pools = self._pools_for(value_field, map_rules.values, "values")
                pairs[key] = self._pick(value_pools, bad=self.rng.random() < bad)

    def pools(self, field: FieldDescriptor) -> Pools:
        """Candidate values of a scalar field: (good, bad, bad ones aimed at its rules)."""
        return self._pools_for(field, field.GetOptions().Extensions[FIELD], "field")

    def _pools_for(self, field: FieldDescriptor, rules: validate_pb2.FieldRules, role: str) -> Pools:
        """Candidate values of a scalar field, item, key or value; cached per role."""
        key = (field.full_name, role)
        if key not in self._pools:
            candidates = self._candidates(field, rules)
            good = [v for v in candidates if self._fits(v, field, rules, role)]
            poor = [v for v in candidates if v not in good or (isinstance(v, float) and math.isnan(v))]
            targeted = [v for v in poor if v not in GENERIC_VALUES]
            self._pools[key] = (good, poor, targeted)
        return self._pools[key]

    def _pick(self, pools: Pools, *, bad: bool) -> Any:
        """A good value, or a bad one (mostly one aimed at a rule's boundary rather than junk)."""
        good, poor, targeted = pools
        if bad and targeted and self.rng.random() < 0.7:
            return self.rng.choice(targeted)
        return self.rng.choice(poor if (bad and poor) or not good else good)

    def _fits(  # noqa: PLR0911  # one answer per kind of rule
        self, value: Any, field: FieldDescriptor, rules: validate_pb2.FieldRules, role: str
    ) -> bool:
        kind = rules.WhichOneof("type")
        zero = value == field.default_value and not (isinstance(value, float) and math.isnan(value))
        if zero and rules.required and role == "field":
            return False
        if zero and rules.ignore in (IGNORE_IF_ZERO, IGNORE_ALWAYS):
            return True
        if kind is None:
            return True
        typed = getattr(rules, kind)
        if kind in ("timestamp", "duration"):
            return time_fits(value, typed)
        if kind == "string":
            return string_fits(value, typed)
        if kind == "enum":
            defined = field.enum_type is not None and value in field.enum_type.values_by_number
            members = getattr(typed, "in")
            return (
                (defined or not typed.defined_only)
                and (not members or value in members)
                and value not in typed.not_in
                and (not typed.HasField("const") or value == typed.const)
            )
        if kind == "bool":
            return not typed.HasField("const") or value == typed.const
        return number_fits(value, typed)

    def _candidates(self, field: FieldDescriptor, rules: validate_pb2.FieldRules) -> list[Any]:
        kind = rules.WhichOneof("type")
        if time_kind(field) is not None:
            return self._time_candidates(time_kind(field) or "", getattr(rules, kind) if kind else None)
        if field.type == T.TYPE_STRING:
            return self._string_candidates(rules.string if kind == "string" else None)
        if field.type == T.TYPE_BOOL:
            return [False, True]
        if field.type == T.TYPE_BYTES:
            return [b"", b"x", b"\x00\xff"]
        if field.type == T.TYPE_ENUM:
            assert field.enum_type is not None
            numbers = sorted(field.enum_type.values_by_number)
            return [*numbers, max(numbers) + 1, 99, -1]
        typed = getattr(rules, kind) if kind is not None else None
        return self._number_candidates(field.type, typed)

    def _string_candidates(self, rules: validate_pb2.StringRules | None) -> list[str]:  # noqa: PLR0912  # per rule
        out = list(JUNK_STRINGS)
        if rules is None:
            return out
        for name in ("min_len", "max_len", "len", "min_bytes", "max_bytes", "len_bytes"):
            if rules.HasField(name):
                size = getattr(rules, name)
                for count in (size - 1, size, size + 1):
                    if 0 <= count <= 5000:
                        out += ["a" * count, "é" * count, "😀" * count]
        if rules.HasField("pattern"):
            sampler = RegexSampler(rules.pattern, self.rng)
            for _ in range(8):
                sample = sampler.sample()
                out += [sample, sample + "\n", "\n" + sample, sample + "/", sample[:-1], sample.upper(),
                        sample + "x" * 70, "é" + sample, sample.replace("/", "//"), sample[1:]]
        if rules.HasField("const"):
            out += [rules.const, rules.const + "x", rules.const.upper()]
        for member in [*getattr(rules, "in"), *rules.not_in]:
            out += [member, member + "x"]
        for affix in (rules.prefix, rules.suffix, rules.contains, rules.not_contains):
            if affix:
                out += [affix, affix + "mid", "mid" + affix, rules.prefix + "mid" + rules.suffix,
                        rules.prefix + rules.contains + rules.suffix,
                        rules.prefix + rules.contains + rules.not_contains + rules.suffix]
        if rules.email:
            out += GOOD_EMAILS + BAD_EMAILS
        if rules.uuid or rules.tuuid:
            ident = uuid.UUID(int=self.rng.getrandbits(128))
            out += [str(ident), str(ident).upper(), ident.hex, ident.hex.upper(), str(ident)[:-1] + "g",
                    "{" + str(ident) + "}", str(ident) + "\n"]
        return list(dict.fromkeys(out))

    def _time_candidates(self, kind: str, rules: Any) -> list[tuple[int, int]]:
        """(seconds, nanos) pairs: each bound and its neighbours (1 ns, 1 µs, 1 s, 1 day away), now, extremes."""
        now = time.time_ns()
        totals = [0, NANOS, -NANOS, now, now - 3600 * NANOS, now + 3600 * NANOS,
                  self.rng.randrange(0, 4_000_000_000) * NANOS + self.rng.randrange(NANOS)]
        if kind == "timestamp":
            totals += [FIRST_SECOND * NANOS, LAST_SECOND * NANOS + NANOS - 1]
        else:
            totals += [-(10**10) * NANOS, 10**10 * NANOS]
        if rules is not None:
            bounds = [getattr(rules, n) for n in ("gt", "gte", "lt", "lte", "const") if rules.HasField(n)]
            bounds += [*getattr(rules, "in", []), *getattr(rules, "not_in", [])]
            if has_within(rules):
                span = rules.within.seconds * NANOS + rules.within.nanos
                bounds += [Timestamp(seconds=(now + span) // NANOS), Timestamp(seconds=(now - span) // NANOS)]
            for bound in bounds:
                exact = bound.seconds * NANOS + bound.nanos
                totals += [exact + delta for delta in (0, 1, -1, 1000, -1000, NANOS, -NANOS, 86400 * NANOS)]
        low, high = (FIRST_SECOND * NANOS, (LAST_SECOND + 1) * NANOS) if kind == "timestamp" else (
            -(10**10) * NANOS, 10**10 * NANOS)
        return list(dict.fromkeys(time_pair(t, kind) for t in totals if low <= t < high))

    def _number_candidates(self, field_type: int, rules: Any) -> list[Any]:
        is_float = field_type in FLOAT_TYPES
        out: list[Any] = list(NUMBERS_ANYWHERE)
        bounds = []
        if rules is not None:
            bounds = [getattr(rules, n) for n in ("gt", "gte", "lt", "lte", "const") if rules.HasField(n)]
            bounds += [*getattr(rules, "in"), *rules.not_in]
        for bound in bounds:
            deltas = (-1, 0, 1) if not is_float else (-0.5, -1e-9, 0, 1e-9, 0.5)
            out += [bound + d for d in deltas]
        if is_float:
            out = [float(v) for v in out] + [math.nan, math.inf, -math.inf, -0.0, 1e30]
            if field_type == T.TYPE_FLOAT:  # stored as float32; compare what is stored
                out = [float(_as_float32(v)) for v in out]
            return list(dict.fromkeys(out))
        low, high = INT_LIMITS[field_type]
        out += [low, high]
        return [int(v) for v in dict.fromkeys(out) if low <= v <= high]


def _as_float32(value: float) -> float:
    try:
        return float(struct.unpack("f", struct.pack("f", value))[0])
    except OverflowError:
        return math.copysign(math.inf, value)


# --- a synthetic contract using every supported rule ---------------------------------------

ZOO_PACKAGE = "fittracker.testing.validationzoo"


def _rules(**kwargs: Any) -> validate_pb2.FieldRules:
    return validate_pb2.FieldRules(**kwargs)


def _with_in(rules: Any, members: list[Any]) -> Any:
    """``rules`` with its ``in`` list set (``in`` is a Python keyword, so no constructor argument)."""
    getattr(rules, "in").extend(members)
    return rules


def loose(message: Message) -> Any:
    """``message`` without its type stubs, to set values the stubs rightly refuse (undefined enums)."""
    return message


STR, I32, I64, U32, U64 = T.TYPE_STRING, T.TYPE_INT32, T.TYPE_INT64, T.TYPE_UINT32, T.TYPE_UINT64
SR, IR, DR, FR, ER = (validate_pb2.StringRules, validate_pb2.Int32Rules, validate_pb2.DoubleRules,
                      validate_pb2.FloatRules, validate_pb2.EnumRules)


class ProtoBuilder:
    """Builds a proto3 file with buf.validate options in code, for contracts the repo lacks."""

    def __init__(self, name: str, package: str) -> None:
        self.file = descriptor_pb2.FileDescriptorProto(
            name=name, package=package, syntax="proto3", dependency=["buf/validate/validate.proto"]
        )
        self.package = package

    def message(self, name: str) -> descriptor_pb2.DescriptorProto:
        return self.file.message_type.add(name=name)

    def field(
        self,
        message: descriptor_pb2.DescriptorProto,
        name: str,
        kind: int,
        rules: validate_pb2.FieldRules | None = None,
        *,
        repeated: bool = False,
        type_name: str = "",
        optional: bool = False,
        oneof: str | None = None,
    ) -> descriptor_pb2.FieldDescriptorProto:
        field = message.field.add(
            name=name,
            number=len(message.field) + 1,
            type=kind,
            label=T.LABEL_REPEATED if repeated else T.LABEL_OPTIONAL,
        )
        if type_name:
            field.type_name = f".{self.package}.{type_name}"
        if rules is not None:
            field.options.Extensions[FIELD].CopyFrom(rules)
        if optional or oneof:
            names = [o.name for o in message.oneof_decl]
            wanted = oneof or f"_{name}"
            if wanted not in names:
                message.oneof_decl.add(name=wanted)
                names.append(wanted)
            field.oneof_index = names.index(wanted)
            field.proto3_optional = optional
        return field

    def map_field(
        self, message: descriptor_pb2.DescriptorProto, name: str, key: int, value: int,
        rules: validate_pb2.FieldRules | None = None, *, value_type: str = "",
    ) -> None:
        entry_name = "".join(part.title() for part in name.split("_")) + "Entry"
        entry = message.nested_type.add(name=entry_name)
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=key, label=T.LABEL_OPTIONAL)
        value_field = entry.field.add(name="value", number=2, type=value, label=T.LABEL_OPTIONAL)
        if value_type:
            value_field.type_name = f".{self.package}.{value_type}"
        self.field(message, name, T.TYPE_MESSAGE, rules, repeated=True, type_name=f"{message.name}.{entry_name}")

    def build(self) -> descriptor_pool.DescriptorPool:
        pool = descriptor_pool.Default()
        pool.AddSerializedFile(self.file.SerializeToString())
        return pool


class Zoo:
    """A synthetic contract with every standard rule the compiler supports, including ones ours lack.

    Scalar rules each get a message of their own with one field, so every candidate value can be
    tried one by one (protovalidate costs ~2 ms per rule per message, too much for big messages);
    the structural rules (recursion, oneofs, lists and maps of messages) share a few composites.
    """

    def __init__(self, singles: list[Descriptor], composites: list[Descriptor]) -> None:
        self.singles = singles
        self.composites = composites


def build_zoo() -> Zoo:
    """Build and register the synthetic contract."""
    b = ProtoBuilder("tests/runtime/validation_zoo.proto", ZOO_PACKAGE)
    singles: list[str] = []

    def single(name: str) -> descriptor_pb2.DescriptorProto:
        message = b.message(f"One{len(singles)}" + "".join(part.title() for part in name.split("_")))
        singles.append(message.name)
        return message

    def one(name: str, kind: int, rules: validate_pb2.FieldRules, **options: Any) -> None:
        b.field(single(name), name, kind, rules, **options)

    def one_map(name: str, key: int, value: int, rules: validate_pb2.FieldRules) -> None:
        b.map_field(single(name), name, key, value, rules)

    color = b.file.enum_type.add(name="Color")
    for number, name in enumerate(["COLOR_UNSPECIFIED", "COLOR_RED", "COLOR_GREEN", "COLOR_BLUE"]):
        color.value.add(name=name, number=number)

    leaf = b.message("Leaf")
    b.field(leaf, "label", STR, _rules(string=SR(min_len=1, max_len=4)))
    b.field(leaf, "child", T.TYPE_MESSAGE, type_name="Leaf")  # recursive
    b.field(leaf, "weight", T.TYPE_DOUBLE, _rules(double=DR(gt=0, lte=10)))

    one("const", STR, _rules(string=SR(const="abc")))
    one("len", STR, _rules(string=SR(len=3)))
    one("bytes", STR, _rules(string=SR(min_bytes=2, max_bytes=6)))
    one("len_bytes", STR, _rules(string=SR(len_bytes=4)))
    one("affixes", STR, _rules(string=SR(prefix="ab", suffix="yz", contains="m", not_contains="bad")))
    one("member", STR, _rules(string=_with_in(SR(), ["red", "green"])))
    one("non_member", STR, _rules(string=SR(not_in=["admin", "root"])))
    one("uuid", STR, _rules(string=SR(uuid=True)))
    one("tuuid", STR, _rules(string=SR(tuuid=True)))
    one("no_email", STR, _rules(string=SR(email=False)))
    one("email", STR, _rules(string=SR(email=True)))
    one("negated", STR, _rules(string=SR(pattern="^[^/]{2,4}$")))
    one("digits", STR, _rules(string=SR(pattern=r"^\d{3}-\w+$")))
    one("re2_only", STR, _rules(string=SR(pattern="(?i)^ab+c")))
    one("unanchored", STR, _rules(string=SR(pattern="b[0-9]")))
    one("opt", STR, _rules(string=SR(min_len=2)), optional=True)
    one("skip_zero", STR, _rules(string=SR(min_len=2), ignore=IGNORE_IF_ZERO))
    one("never", STR, _rules(string=SR(min_len=200), ignore=IGNORE_ALWAYS))
    one("required", STR, _rules(required=True, string=SR(max_len=3)))

    one("gt", I32, _rules(int32=IR(gt=5)))
    one("lt", I32, _rules(int32=IR(lt=-3)))
    one("lte", I32, _rules(int32=IR(lte=4)))
    one("gt_lt", I32, _rules(int32=IR(gt=0, lt=10)))
    one("gt_lt_exclusive", I32, _rules(int32=IR(gt=10, lt=5)))
    one("gt_lte_exclusive", I32, _rules(int32=IR(gt=10, lte=5)))
    one("gte_lt_exclusive", I32, _rules(int32=IR(gte=10, lt=5)))
    one("gte_lte_exclusive", I32, _rules(int32=IR(gte=10, lte=5)))
    one("gte_lte_equal", I32, _rules(int32=IR(gte=3, lte=3)))
    one("const", I32, _rules(int32=IR(const=42)))
    one("member", I32, _rules(int32=_with_in(IR(), [1, 2, 3])))
    one("non_member", I32, _rules(int32=IR(not_in=[0, 13])))
    one("i64", I64, _rules(int64=validate_pb2.Int64Rules(gt=-5, lte=2**40)))
    one("u32", U32, _rules(uint32=validate_pb2.UInt32Rules(gte=1, lt=10)))
    one("u64", U64, _rules(uint64=validate_pb2.UInt64Rules(lte=100, not_in=[7])))
    one("s32", T.TYPE_SINT32, _rules(sint32=validate_pb2.SInt32Rules(gt=0)))
    one("s64", T.TYPE_SINT64, _rules(sint64=validate_pb2.SInt64Rules(lt=0)))
    one("f32", T.TYPE_FIXED32, _rules(fixed32=_with_in(validate_pb2.Fixed32Rules(), [4, 8])))
    one("f64", T.TYPE_FIXED64, _rules(fixed64=validate_pb2.Fixed64Rules(gte=10)))
    one("sf32", T.TYPE_SFIXED32, _rules(sfixed32=validate_pb2.SFixed32Rules(const=-1)))
    one("sf64", T.TYPE_SFIXED64, _rules(sfixed64=validate_pb2.SFixed64Rules(gt=100, lt=-100)))
    one("float_range", T.TYPE_FLOAT, _rules(float=FR(gt=0.5, lt=1.5)))
    one("float_member", T.TYPE_FLOAT, _rules(float=_with_in(FR(), [0.1, 0.25])))
    one("finite", T.TYPE_FLOAT, _rules(float=FR(finite=True)))
    one("double_range", T.TYPE_DOUBLE, _rules(double=DR(gte=-1, lte=1)))
    one("double_exclusive", T.TYPE_DOUBLE, _rules(double=DR(gt=1, lt=-1)))
    one("double_finite", T.TYPE_DOUBLE, _rules(double=DR(finite=True, not_in=[0.5])))
    one("double_const", T.TYPE_DOUBLE, _rules(double=DR(const=2.5)))
    one("big", T.TYPE_DOUBLE, _rules(double=DR(lte=1e6)))
    one("opt", I32, _rules(int32=IR(gte=5)), optional=True)
    one("required", I32, _rules(required=True))
    one("skip_zero", I32, _rules(int32=IR(gte=5), ignore=IGNORE_IF_ZERO))
    one("color", T.TYPE_ENUM, _rules(enum=ER(defined_only=True, not_in=[0])), type_name="Color")
    one("color_const", T.TYPE_ENUM, _rules(enum=ER(const=2)), type_name="Color")
    one("color_member", T.TYPE_ENUM, _rules(enum=_with_in(ER(), [1, 3])), type_name="Color")
    one("flag", T.TYPE_BOOL, _rules(bool=validate_pb2.BoolRules(const=True)))

    b.file.dependency.extend(["google/protobuf/timestamp.proto", "google/protobuf/duration.proto"])
    ts, du, y2000, y2100 = validate_pb2.TimestampRules, validate_pb2.DurationRules, 946684800, 4102444800

    def one_time(name: str, rules: validate_pb2.FieldRules) -> None:
        kind = rules.WhichOneof("type")
        b.field(single(name), name, T.TYPE_MESSAGE, rules).type_name = (
            ".google.protobuf.Timestamp" if kind == "timestamp" else ".google.protobuf.Duration")

    one_time("ts_window", _rules(timestamp=ts(gte=Timestamp(seconds=y2000), lt=Timestamp(seconds=y2100))))
    one_time("ts_gt", _rules(timestamp=ts(gt=Timestamp(seconds=y2000, nanos=500_000_000))))
    one_time("ts_lt", _rules(timestamp=ts(lt=Timestamp(seconds=0, nanos=5_000))))
    one_time("ts_lte", _rules(timestamp=ts(lte=Timestamp(seconds=y2100))))
    one_time("ts_exclusive", _rules(timestamp=ts(gt=Timestamp(seconds=y2100), lt=Timestamp(seconds=y2000))))
    one_time("ts_const", _rules(timestamp=ts(const=Timestamp(seconds=y2000, nanos=1_000))))
    one_time("ts_past", _rules(timestamp=ts(lt_now=True, gt=Timestamp(seconds=y2000))))
    one_time("ts_future", _rules(timestamp=ts(gt_now=True)))
    one_time("ts_within", _rules(timestamp=ts(within=Duration(seconds=3600))))
    one_time("ts_required", _rules(required=True, timestamp=ts(gte=Timestamp(seconds=y2000))))
    # Bounds under a day: protovalidate-python's text for longer durations drops the days.
    one_time("du_range", _rules(duration=du(gte=Duration(seconds=0), lte=Duration(seconds=3600, nanos=500_000_000))))
    one_time("du_gt", _rules(duration=du(gt=Duration(nanos=1_500))))
    one_time("du_exclusive", _rules(duration=du(gt=Duration(seconds=60), lt=Duration(seconds=1))))
    one_time("du_member", _rules(duration=_with_in(du(), [Duration(seconds=1), Duration(seconds=90)])))
    one_time("du_non_member", _rules(duration=du(not_in=[Duration(seconds=0)])))
    one_time("du_const", _rules(duration=du(const=Duration(seconds=2, nanos=250_000_000))))

    rep = validate_pb2.RepeatedRules
    mapr = validate_pb2.MapRules
    one("ints", I32, _rules(repeated=rep(min_items=2, max_items=4, unique=True,
                                                     items=_rules(int32=IR(gte=0)))), repeated=True)
    one("words", STR, _rules(repeated=rep(items=_rules(string=SR(min_len=2), ignore=IGNORE_IF_ZERO))),
            repeated=True)
    one("colors", T.TYPE_ENUM, _rules(repeated=rep(max_items=3, items=_rules(
        enum=_with_in(ER(defined_only=True), [1, 2, 99])))), repeated=True, type_name="Color")
    one("doubles", T.TYPE_DOUBLE, _rules(repeated=rep(unique=True)), repeated=True)
    shapes = b.message("Shapes")
    b.field(shapes, "needed", STR, _rules(required=True), repeated=True)
    b.field(shapes, "leaves", T.TYPE_MESSAGE, _rules(repeated=rep(max_items=2)), repeated=True, type_name="Leaf")
    b.field(shapes, "ignored_leaves", T.TYPE_MESSAGE, _rules(repeated=rep(items=_rules(ignore=IGNORE_ALWAYS))),
            repeated=True, type_name="Leaf")
    b.field(shapes, "leaf", T.TYPE_MESSAGE, _rules(required=True), type_name="Leaf")
    b.field(shapes, "free_leaf", T.TYPE_MESSAGE, type_name="Leaf")
    b.field(shapes, "tags", STR, _rules(repeated=rep(max_items=3, items=_rules(string=SR(max_len=2)))),
            repeated=True)
    one_map("labels", STR, I32, _rules(map=mapr(min_pairs=1, max_pairs=3, keys=_rules(
        string=SR(min_len=2)), values=_rules(int32=IR(gt=0)))))
    one_map("by_id", I32, STR, _rules(map=mapr(keys=_rules(int32=IR(gt=0)),
                                                         values=_rules(string=SR(max_len=3), ignore=IGNORE_IF_ZERO))))
    one_map("flags", T.TYPE_BOOL, STR, _rules(map=mapr(values=_rules(string=SR(min_len=1)))))
    b.map_field(shapes, "leaf_map", STR, T.TYPE_MESSAGE, value_type="Leaf")
    b.map_field(shapes, "unchecked", STR, STR)

    choice = b.message("Choice")
    choice.options.Extensions[validate_pb2.message].oneof.add(fields=["left", "right"], required=True)
    choice.options.Extensions[validate_pb2.message].oneof.add(fields=["up", "down"])
    b.field(choice, "left", STR, _rules(string=SR(min_len=3)))
    b.field(choice, "right", I32)
    b.field(choice, "up", STR)
    b.field(choice, "down", STR, _rules(string=SR(max_len=2), ignore=validate_pb2.IGNORE_UNSPECIFIED))
    b.field(choice, "cat", STR, _rules(string=SR(min_len=2)), oneof="pet")
    b.field(choice, "dog", I32, _rules(int32=IR(gt=0)), oneof="pet")
    choice.oneof_decl[0].options.Extensions[validate_pb2.oneof].required = True
    b.field(choice, "tree", T.TYPE_MESSAGE, type_name="Leaf", oneof="plant")

    pool = b.build()
    return Zoo(
        [pool.FindMessageTypeByName(f"{ZOO_PACKAGE}.{name}") for name in singles],
        [pool.FindMessageTypeByName(f"{ZOO_PACKAGE}.{name}") for name in ("Shapes", "Choice")],
    )


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return build_zoo()


# --- the differential test -----------------------------------------------------------------


def generated(descriptor: Descriptor, samples: int, rng: random.Random) -> Iterator[Message]:
    """``samples`` messages, from all-valid to mostly invalid."""
    sampler = Sampler(rng)
    for index in range(samples):
        yield sampler.message(descriptor, (0.0, 0.0, 0.1, 0.3, 0.7)[index % 5])


def swept(descriptor: Descriptor, rng: random.Random, per_field: int = 3) -> Iterator[Message]:
    """A valid message with one top-level scalar field at a time set to its zero or a bad value.

    Random sampling alone may miss a rule's boundary in a few dozen samples; this cheap sweep
    makes sure every top-level rule is broken at least once.
    """
    sampler = Sampler(rng)
    base = sampler.message(descriptor, 0.0)
    for field in descriptor.fields:
        if field.message_type is not None or field.is_repeated or not field.GetOptions().HasExtension(FIELD):
            continue
        _, poor, targeted = sampler.pools(field)
        for value in dict.fromkeys([field.default_value, *targeted[:per_field], *poor[:1]]):
            message = type(base)()
            message.CopyFrom(base)
            setattr(message, field.name, value)
            yield message


def enumerated(descriptor: Descriptor, rng: random.Random) -> Iterator[Message]:
    """A one-field message with its field unset, then set to each candidate value in turn."""
    message_class = message_factory.GetMessageClass(descriptor)
    field = descriptor.fields[0]
    good, poor, _ = Sampler(rng).pools(field)
    yield message_class()
    for value in dict.fromkeys([*good, *poor]):
        yield message_class(**{field.name: time_message(field, value) if time_kind(field) else value})


def compare(
    oracle: Validator, validator: RequestValidator, messages: Iterable[Message]
) -> tuple[list[str], Counter[str], int]:
    """Run ``messages`` through both validators; (mismatches, rule ids seen, messages without violations)."""
    mismatches: list[str] = []
    seen: Counter[str] = Counter()
    clean = 0
    for index, message in enumerate(messages):
        expected = oracle_violations(oracle, message)
        actual = Counter(validator.violations(message))
        extra = Counter({v: n for v, n in (actual - expected).items() if is_element_defined_only(v)})
        if actual - extra != expected:
            mismatches.append(
                f"{message.DESCRIPTOR.full_name} sample {index}: {message}\n"
                f"  only protovalidate: {sorted((expected - actual).elements())}\n"
                f"  only compiled: {sorted((actual - expected - extra).elements())}"
            )
        seen.update(v.rule_id for v in actual)
        clean += not actual
    return mismatches, seen, clean


def seeded(seed: object) -> random.Random:
    """A deterministic generator of test data (not of secrets)."""
    return random.Random(str(seed))  # noqa: S311  # reproducible test inputs, nothing secret


def test_every_request_type_matches_protovalidate(oracle: Validator, caplog: pytest.LogCaptureFixture) -> None:
    validator = RequestValidator()
    rng = seeded(SEED)
    types = request_types() + standalone_types()
    assert len(types) > 40, [t.full_name for t in types]
    mismatches: list[str] = []
    seen: Counter[str] = Counter()
    never_clean = []
    with caplog.at_level(logging.WARNING, logger="fittracker.validation"):
        for descriptor in types:
            messages = itertools.chain(generated(descriptor, round(20 * FUZZ), rng), swept(descriptor, rng))
            found, rules, clean = compare(oracle, validator, messages)
            mismatches += found
            seen += rules
            if not clean and has_rules(descriptor):
                never_clean.append(descriptor.full_name)
    assert not mismatches, "\n".join(mismatches[:15])
    assert not never_clean, f"the generator produced no valid message for {never_clean}"
    # The generator must have broken every kind of rule our contracts use.
    for rule_id in ["string.pattern", "string.min_len", "string.max_len", "string.email", "string.email_empty",
                    "string.uuid", "int32.gte_lte", "int32.gte_lt", "int64.gte", "int32.gte", "double.gte_lte",
                    "double.in", "enum.defined_only", "enum.not_in", "repeated.max_items", "repeated.unique",
                    "map.max_pairs", "required"]:
        assert seen[rule_id] > 0, f"no sample broke {rule_id}: {sorted(seen)}"
    fallbacks = [r.getMessage() for r in caplog.records if r.name == "fittracker.validation"]
    assert not fallbacks, f"our contracts should need no protovalidate fallback: {fallbacks}"


def test_every_supported_rule_matches_protovalidate(oracle: Validator, zoo: Zoo) -> None:
    validator = RequestValidator()
    rng = seeded(SEED + 1)
    mismatches: list[str] = []
    seen: Counter[str] = Counter()
    for descriptor in zoo.singles + zoo.composites:
        field = descriptor.fields[0]
        if descriptor in zoo.singles and not field.is_repeated:
            messages: Iterable[Message] = enumerated(descriptor, rng)
        else:
            messages = generated(descriptor, round(25 * FUZZ), rng)
        found, rules, clean = compare(oracle, validator, messages)
        mismatches += found
        seen += rules
        assert clean, f"no valid {descriptor.full_name} was generated"
    assert not mismatches, "\n".join(mismatches[:15])
    expected_rules = {
        "string.const", "string.len", "string.min_bytes", "string.max_bytes", "string.len_bytes", "string.prefix",
        "string.suffix", "string.contains", "string.not_contains", "string.in", "string.not_in", "string.uuid",
        "string.uuid_empty", "string.tuuid", "string.email", "string.pattern", "int32.gt", "int32.lt", "int32.lte",
        "int32.gt_lt", "int32.gt_lt_exclusive", "int32.gt_lte_exclusive", "int32.gte_lt_exclusive",
        "int32.gte_lte_exclusive", "int32.const", "int32.in", "int32.not_in", "int64.gt_lte", "uint32.gte_lt",
        "uint64.lte", "uint64.not_in", "sint32.gt", "sint64.lt", "fixed32.in", "fixed64.gte", "sfixed32.const",
        "sfixed64.gt_lt_exclusive", "float.gt_lt", "float.in", "float.finite", "double.gte_lte",
        "double.gt_lt_exclusive", "double.finite", "double.not_in", "double.const", "double.lte", "enum.const",
        "enum.in", "enum.not_in", "enum.defined_only", "bool.const", "repeated.min_items", "repeated.max_items",
        "repeated.unique", "map.min_pairs", "map.max_pairs", "message.oneof", "required", "double.gt_lte",
        "timestamp.gte_lt", "timestamp.gt", "timestamp.lt", "timestamp.lte", "timestamp.gt_lt_exclusive",
        "timestamp.const", "timestamp.lt_now", "timestamp.gt_now", "timestamp.within", "duration.gte_lte",
        "duration.gt", "duration.gt_lt_exclusive", "duration.in", "duration.not_in", "duration.const",
    }
    assert expected_rules <= set(seen), sorted(expected_rules - set(seen))


# --- direct tests: paths, the error, the sanctioned difference -----------------------------


def test_paths_name_nested_fields_items_map_keys_and_oneofs() -> None:
    validator = RequestValidator()
    preferences = loose(user_service_pb2.UpdatePreferencesRequest())
    preferences.preferences.goals.weekly_workout_target = 99
    preferences.preferences.goals.available_equipment.extend([1, 2, 999])
    assert validator.violations(preferences) == [
        Violation(
            "preferences.goals.weekly_workout_target", "int32.gte_lte",
            "must be greater than or equal to 0 and less than or equal to 14",
        ),
        Violation("preferences.goals.available_equipment[2]", "enum.defined_only",
                  "value must be one of the defined enum values"),
    ]
    send = notification_service_pb2.SendNotificationRequest(
        parent="users/u1", title="t", body="b", category=notification_pb2.CATEGORY_SYSTEM,
        data={"ok": "v", "": "x", "long": "y" * 1025},
    )
    assert sorted(validator.violations(send)) == [
        Violation("data['']", "string.min_len", "must be at least 1 characters"),
        Violation("data['long']", "string.max_len", "must be at most 1024 characters"),
    ]
    assert validator.violations(ai_service_pb2.StreamFormAnalysisRequest()) == [
        Violation("content", "required", "exactly one field is required in oneof")
    ]
    routine = workout_service_pb2.CreateRoutineRequest(parent="users/u1")
    routine.routine.display_name = "Push"
    routine.routine.exercises.add(exercise="exercises/a", target_sets=3)
    routine.routine.exercises.add(exercise="exercises/b", target_sets=0)
    assert validator.violations(routine) == [
        Violation("routine.exercises[1].target_sets", "int32.gte_lte",
                  "must be greater than or equal to 1 and less than or equal to 20")
    ]


def test_check_raises_invalid_argument_with_every_violation() -> None:
    validator = RequestValidator()
    validator.check(user_service_pb2.RegisterRequest(email="a@b.c", password="p" * 10, display_name="Sam"))
    with pytest.raises(InvalidArgument) as raised:
        validator.check(user_service_pb2.RegisterRequest(email="nope", password="short", display_name="Sam"))
    assert raised.value.violations == [
        ("email", "must be a valid email address"),
        ("password", "must be at least 10 characters"),
    ]
    assert raised.value.message == "invalid email: must be a valid email address (and 1 more)"


def test_field_path_renders_protovalidate_paths() -> None:
    path = validate_pb2.FieldPath(elements=[
        validate_pb2.FieldPathElement(field_name="routine"),
        validate_pb2.FieldPathElement(field_name="exercises", index=2),
        validate_pb2.FieldPathElement(field_name="data", string_key="k"),
        validate_pb2.FieldPathElement(field_name="by_id", int_key=-4),
        validate_pb2.FieldPathElement(field_name="notes"),
    ])
    assert field_path(path) == "routine.exercises[2].data['k'].by_id[-4].notes"


def test_enum_items_defined_only_is_checked_where_protovalidate_python_skips_it(oracle: Validator) -> None:
    request = notification_service_pb2.SendNotificationRequest(
        parent="users/u1", title="t", body="b", category=notification_pb2.CATEGORY_SYSTEM
    )
    loose(request).channels.extend([1, 77])
    assert not oracle_violations(oracle, request)
    assert RequestValidator().violations(request) == [
        Violation("channels[1]", "enum.defined_only", "value must be one of the defined enum values")
    ]


# --- fallback to protovalidate --------------------------------------------------------------


def build_fallback_types() -> dict[str, Descriptor]:
    package = "fittracker.testing.validationfallback"
    b = ProtoBuilder("tests/runtime/validation_fallback.proto", package)
    coded = b.message("Coded")
    coded_rules = validate_pb2.FieldRules()
    coded_rules.cel.add(id="code.prefix", message="must start with X", expression="this.startsWith('X')")
    b.field(coded, "code", T.TYPE_STRING, coded_rules)
    b.field(coded, "size", T.TYPE_INT32, _rules(int32=validate_pb2.Int32Rules(gte=1)))
    pair = b.message("Pair")
    pair.options.Extensions[validate_pb2.message].cel.add(
        id="pair.order", message="low must not exceed high", expression="this.low <= this.high"
    )
    b.field(pair, "low", T.TYPE_INT32)
    b.field(pair, "high", T.TYPE_INT32)
    holder = b.message("Holder")
    b.field(holder, "name", T.TYPE_STRING, _rules(string=validate_pb2.StringRules(min_len=2)))
    b.field(holder, "coded", T.TYPE_MESSAGE, type_name="Coded")
    b.field(holder, "many", T.TYPE_MESSAGE, repeated=True, type_name="Coded")
    b.field(holder, "pair", T.TYPE_MESSAGE, type_name="Pair")
    b.map_field(holder, "by_key", T.TYPE_STRING, T.TYPE_MESSAGE, value_type="Coded")
    broken = b.message("BrokenPattern")
    b.field(broken, "value", T.TYPE_STRING, _rules(string=SR(pattern="(")))
    pool = b.build()
    names = ("Coded", "Pair", "Holder", "BrokenPattern")
    return {name: pool.FindMessageTypeByName(f"{package}.{name}") for name in names}


@pytest.fixture(scope="module")
def fallback_types() -> dict[str, Descriptor]:
    return build_fallback_types()


def test_unsupported_rules_fall_back_to_protovalidate_per_type(
    oracle: Validator, caplog: pytest.LogCaptureFixture, fallback_types: dict[str, Descriptor]
) -> None:
    types = fallback_types
    # A class built from a descriptor at run time has no static fields for the type checker to see.
    holder_class: Any = message_factory.GetMessageClass(types["Holder"])
    validator = RequestValidator()
    holder: Any = holder_class(name="x")
    holder.coded.code = "abc"
    holder.many.add(code="Xyz", size=1)
    holder.many.add(code="nope", size=0)
    holder.pair.low, holder.pair.high = 5, 1
    holder.by_key["k"].code = "q"
    with caplog.at_level(logging.WARNING, logger="fittracker.validation"):
        first = validator.violations(holder)
        second = validator.violations(holder)
    assert first == second
    assert Counter(first) == oracle_violations(oracle, holder)
    assert set(first) == {
        Violation("name", "string.min_len", "must be at least 2 characters"),
        Violation("coded.code", "code.prefix", "must start with X"),
        Violation("coded.size", "int32.gte", "must be greater than or equal to 1"),
        Violation("many[1].code", "code.prefix", "must start with X"),
        Violation("many[1].size", "int32.gte", "must be greater than or equal to 1"),
        Violation("pair", "pair.order", "low must not exceed high"),
        Violation("by_key['k'].code", "code.prefix", "must start with X"),
        Violation("by_key['k'].size", "int32.gte", "must be greater than or equal to 1"),
    }
    # One warning per type that falls back, naming the rule; Holder itself stays compiled.
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "fittracker.validation")
    assert len(warnings) == 2, warnings
    assert "validationfallback.Coded" in warnings[0] and "CEL expression (cel)" in warnings[0]
    assert "validationfallback.Pair" in warnings[1] and "(buf.validate.message).cel" in warnings[1]
    with pytest.raises(InvalidArgument) as raised:
        validator.check(holder_class(name="ok", pair={"low": 2, "high": 1}))
    assert raised.value.violations == [("pair", "low must not exceed high")]


def test_a_pattern_re2_rejects_fails_as_protovalidate_does(
    oracle: Validator, caplog: pytest.LogCaptureFixture, fallback_types: dict[str, Descriptor]
) -> None:
    broken_pattern: Any = message_factory.GetMessageClass(fallback_types["BrokenPattern"])
    message = broken_pattern(value="x")
    with pytest.raises(Exception) as theirs:  # whatever protovalidate raises, the fallback raises too
        oracle.collect_violations(message)
    with caplog.at_level(logging.WARNING, logger="fittracker.validation"), pytest.raises(type(theirs.value)):
        RequestValidator().check(message)
    assert "pattern '('" in caplog.text


# --- the RE2 -> re translation ---------------------------------------------------------------

UNTRANSLATABLE = ["(?i)^abc$", "abc", "^a+a$", "^(ab)+$", r"^\d+\s*x$", r"^\pL+$", "^a|b$", r"^[\s\S]$"]
TRANSLATABLE = [
    "^a.c$", "^[^/]+/x$", r"^\d{3}-\w+$", "^(?:ab)c$", "^[a-]x$", r"^\.\*$", "^x{2,}y$", "^$|^[0-9]{4}$",
    r"^\S{2}@x$", "^[]a]b$", r"^\W-$", "^ab*?c$",
]


def fuzz_strings(pattern: str, rng: random.Random, count: int) -> Iterator[str]:
    """Samples of ``pattern``, their mutations, and random strings over its alphabet."""
    alphabet = sorted(set(pattern) | set("aA0/-_.\n é😀"))
    try:
        sampler: RegexSampler | None = RegexSampler(pattern, rng)
        assert sampler is not None
        sampler.sample()
    except (IndexError, KeyError, ValueError):
        sampler = None
    for _ in range(count):
        if sampler is not None and rng.random() < 0.5:
            text = sampler.sample()
            mutation = rng.randrange(5)
            if mutation == 1:
                text += "\n"
            elif mutation == 2 and text:
                position = rng.randrange(len(text))
                text = text[:position] + rng.choice(alphabet) + text[position + 1 :]
            elif mutation == 3:
                text = text[: len(text) // 2]
            yield text
        else:
            yield "".join(rng.choice(alphabet) for _ in range(rng.randrange(9)))


@pytest.mark.parametrize("pattern", [*proto_patterns(), *TRANSLATABLE, *UNTRANSLATABLE])
def test_compiled_patterns_agree_with_re2(pattern: str) -> None:
    search = compile_search(pattern)
    rng = seeded(f"{SEED}{pattern}")
    for text in fuzz_strings(pattern, rng, 400):
        assert bool(search(text)) == (re2.search(pattern, text) is not None), (pattern, text)


def test_translation_covers_our_patterns_and_refuses_unsafe_ones() -> None:
    assert all(translate(p) is not None for p in proto_patterns()), [p for p in proto_patterns() if not translate(p)]
    assert all(translate(p) is not None for p in TRANSLATABLE), [p for p in TRANSLATABLE if not translate(p)]
    assert all(translate(p) is None for p in UNTRANSLATABLE), [p for p in UNTRANSLATABLE if translate(p)]
    assert translate("^users/[A-Za-z0-9_-]{1,64}$") == r"^users\/[\-0-9A-Z\_a-z]{1,64}\Z"


def test_email_check_agrees_with_protovalidate(oracle: Validator) -> None:
    rng = seeded(SEED)
    validator = RequestValidator()
    corpus = GOOD_EMAILS + BAD_EMAILS + list(fuzz_strings(EMAIL_PATTERN, rng, 150))
    for text in corpus:
        request = user_service_pb2.RegisterRequest(email=text, password="p" * 10, display_name="x")
        mine = {v for v in validator.violations(request) if v.field == "email"}
        theirs = {v for v in oracle_violations(oracle, request) if v.field == "email"}
        assert mine == theirs, text


@pytest.mark.timeout(60)  # a deadline, not a speed check: backtracking on these inputs runs for hours
def test_patterns_stay_linear_on_hostile_input() -> None:
    validator = RequestValidator()
    hostile = [
        "users/" + "a" * 200_000 + "!",
        "a" * 200_000,
        "users/" + "a/" * 100_000,
        "a" * 100_000 + "@" + "b." * 50_000 + "!",
        "a@" + "b" * 62 + "-" * 100_000,
    ]
    for text in hostile:
        validator.violations(workout_service_pb2.LogSetRequest(parent=text, request_id=text))
        validator.violations(user_service_pb2.RegisterRequest(email=text))
        for pattern in proto_patterns():
            compile_search(pattern)(text)
        compile_search(EMAIL_PATTERN)(text)

