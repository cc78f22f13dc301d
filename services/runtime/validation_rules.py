"""Compiles a message type's ``buf.validate`` rules into plain-Python checks.

protovalidate-python evaluates every standard rule as a CEL program (cel-python), which costs
milliseconds per message. The standard rules are fixed, documented expressions, so this module
reads them from the descriptor options once and builds closures computing the same verdicts
with the same rule ids and messages (the texts of the CEL expressions in ``validate.proto``).

Semantics follow protovalidate 1.2 (the oracle the tests compare against) rule by rule:

* a field is *empty* when unset (fields with presence), empty (repeated, map) or equal to its
  default (other scalars); ``required`` fails on empty fields, and empty fields with presence or
  ``IGNORE_IF_ZERO_VALUE`` skip their other rules; ``IGNORE_ALWAYS`` drops the field entirely;
* members of a ``(buf.validate.message).oneof`` are ``IGNORE_IF_ZERO_VALUE`` unless told otherwise;
* set sub-messages (singular, repeated, map values) are validated recursively.

One deliberate difference: ``enum.defined_only`` is checked on repeated items and map
keys/values too, as the protovalidate specification and its Go/Java/C++ implementations do;
protovalidate-python 1.2 silently skips it there.

Timestamps and durations are compared as protovalidate-python 1.2 compares them: converted to
whole microseconds (nanos floored), with ``now`` read once per check. Values outside the range
Python's datetime can hold, which protovalidate-python cannot convert (it raises), simply compare
and fail any range rule, so a contract's bounds keep absurd times away from the service code.

Rules without a plain-Python equivalent here (CEL expressions, predefined rule extensions,
bytes/any/field-mask rules, the host/IP/URI string formats, ...) raise ``UnsupportedRule`` so
the caller validates that message type with protovalidate instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sized
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple

from buf.validate import validate_pb2
from google.protobuf import unknown_fields
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, OneofDescriptor
from google.protobuf.message import Message

from services.runtime.validation_regex import PatternError, compile_search


class Violation(NamedTuple):
    """One broken rule: the field path (empty for the message itself), the rule id, what is wrong."""

    field: str
    rule_id: str
    message: str


#: (rule id, message) of a failed rule.
Problem = tuple[str, str]
#: A rule on one value: a predicate true when the value breaks it, and the problem to report.
#: Pairs rather than closures returning the problem: one Python call per rule, not two.
ValueCheck = tuple[Callable[[Any], bool], Problem]
#: Validates a message, appending its violations (paths relative to it) to the list.
Runner = Callable[[Any, list[Violation]], None]


class UnsupportedRule(Exception):
    """A rule this module cannot compile; the message names it (``Type.field: rule``)."""


_T = FieldDescriptor
_INTEGER_KINDS = {
    "int32": _T.TYPE_INT32,
    "int64": _T.TYPE_INT64,
    "uint32": _T.TYPE_UINT32,
    "uint64": _T.TYPE_UINT64,
    "sint32": _T.TYPE_SINT32,
    "sint64": _T.TYPE_SINT64,
    "fixed32": _T.TYPE_FIXED32,
    "fixed64": _T.TYPE_FIXED64,
    "sfixed32": _T.TYPE_SFIXED32,
    "sfixed64": _T.TYPE_SFIXED64,
}
_FLOAT_KINDS = {"float": _T.TYPE_FLOAT, "double": _T.TYPE_DOUBLE}
_FIELD_TYPE_OF_RULES = {
    **_INTEGER_KINDS,
    **_FLOAT_KINDS,
    "string": _T.TYPE_STRING,
    "bool": _T.TYPE_BOOL,
    "enum": _T.TYPE_ENUM,
}
_NUMBER_RULES = frozenset({"const", "lt", "lte", "gt", "gte", "in", "not_in", "example"})
_FLOAT_RULES = _NUMBER_RULES | {"finite"}
#: The well-known message type each time rule kind applies to.
_TIME_TYPES = {"timestamp": "google.protobuf.Timestamp", "duration": "google.protobuf.Duration"}
_TIMESTAMP_RULES = frozenset({"const", "lt", "lte", "gt", "gte", "lt_now", "gt_now", "within", "example"})
_DURATION_RULES = _NUMBER_RULES

# The string formats whose CEL rule is "empty, or matches this regex" (validate.proto).
_FORMAT_PATTERNS = {
    "uuid": ("^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$", "UUID"),
    "tuuid": ("^[0-9a-fA-F]{32}$", "trimmed UUID"),
    "ulid": ("^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$", "ULID"),
    "protobuf_fqn": (
        r"^[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$",
        "fully-qualified Protobuf name",
    ),
    "protobuf_dot_fqn": (
        r"^\.[A-Za-z_][A-Za-z_0-9]*(\.[A-Za-z_][A-Za-z_0-9]*)*$",
        "fully-qualified Protobuf name with a leading dot",
    ),
}
# protovalidate's isEmail(): the WHATWG "valid e-mail address" production, matched in full.
# Python's re agrees with RE2 on it (ASCII classes, fullmatch) and stays linear: every
# repetition is bounded or followed by a character it cannot consume.
EMAIL_PATTERN = (
    r"^[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]+@[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*$"
)
_EMAIL = re.compile(EMAIL_PATTERN).fullmatch
_STRING_RULES = frozenset(
    {
        "const", "len", "min_len", "max_len", "len_bytes", "min_bytes", "max_bytes", "pattern",
        "prefix", "suffix", "contains", "not_contains", "in", "not_in", "email", "example", "strict",
        *_FORMAT_PATTERNS,
    }
)
_ENUM_RULES = frozenset({"const", "defined_only", "in", "not_in", "example"})
_BOOL_RULES = frozenset({"const", "example"})
_REPEATED_RULES = frozenset({"min_items", "max_items", "unique", "items"})
_MAP_RULES = frozenset({"min_pairs", "max_pairs", "keys", "values"})
_FIELD_LEVEL = frozenset({"required", "ignore", "type"})

_REQUIRED: Problem = ("required", "value is required")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_IGNORE_IF_ZERO = validate_pb2.IGNORE_IF_ZERO_VALUE
_IGNORE_ALWAYS = validate_pb2.IGNORE_ALWAYS


# --- formatting, as protovalidate's CEL string.format() renders %s -------------------------


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return f"{value:g}"
    if isinstance(value, str | int):
        return str(value)
    return "[" + ", ".join(_format(item) for item in value) + "]"


def _when(failed: Callable[[Any], bool], rule_id: str, message: str) -> ValueCheck:
    """A check reporting ``(rule_id, message)`` for values where ``failed`` is true."""
    return failed, (rule_id, message)


def _differs(expected: Any) -> Callable[[Any], bool]:
    return lambda v: bool(v != expected)


def _not_in(members: frozenset[Any]) -> Callable[[Any], bool]:
    return lambda v: v not in members


def _fewer_than(count: int) -> Callable[[Sized], bool]:
    return lambda v: len(v) < count


def _more_than(count: int) -> Callable[[Sized], bool]:
    return lambda v: len(v) > count


def _message_type(field: FieldDescriptor) -> Descriptor:
    if field.message_type is None:
        raise UnsupportedRule(f"{field.full_name}: expected a message field")
    return field.message_type


def _enum_type(field: FieldDescriptor) -> EnumDescriptor:
    if field.enum_type is None:
        raise UnsupportedRule(f"{field.full_name}: expected an enum field")
    return field.enum_type


# --- scalar rules --------------------------------------------------------------------------


def _supported_fields(rules: Message, supported: frozenset[str], where: str) -> list[tuple[str, Any]]:
    """The set rules of ``rules`` as (name, value), refusing anything outside ``supported``."""
    if len(unknown_fields.UnknownFieldSet(rules)) > 0:
        raise UnsupportedRule(f"{where}: unknown rules in {rules.DESCRIPTOR.full_name}")
    listed: list[tuple[str, Any]] = []
    for field, value in rules.ListFields():
        if field.is_extension:
            raise UnsupportedRule(f"{where}: predefined rule [{field.full_name}]")
        if field.name not in supported:
            raise UnsupportedRule(f"{where}: {rules.DESCRIPTOR.name}.{field.name}")
        listed.append((field.name, value))
    return listed


def _string_checks(rules: validate_pb2.StringRules, where: str) -> list[ValueCheck]:
    checks: list[ValueCheck] = []
    for name, value in _supported_fields(rules, _STRING_RULES, where):
        checks.extend(_string_rule(name, value, where))
    return checks


def _string_rule(name: str, value: Any, where: str) -> list[ValueCheck]:  # noqa: PLR0911, PLR0912  # one branch per rule
    rule_id = f"string.{name}"
    # len() of a Python str counts code points, as CEL's size() does.
    if name == "const":
        return [_when(lambda v: v != value, rule_id, f"must equal `{value}`")]
    if name == "len":
        return [_when(lambda v: len(v) != value, rule_id, f"must be {value} characters")]
    if name == "min_len":
        return [_when(lambda v: len(v) < value, rule_id, f"must be at least {value} characters")]
    if name == "max_len":
        return [_when(lambda v: len(v) > value, rule_id, f"must be at most {value} characters")]
    if name == "len_bytes":
        return [_when(lambda v: len(v.encode()) != value, rule_id, f"must be {value} bytes")]
    if name == "min_bytes":
        return [_when(lambda v: len(v.encode()) < value, rule_id, f"must be at least {value} bytes")]
    if name == "max_bytes":
        return [_when(lambda v: len(v.encode()) > value, rule_id, f"must be at most {value} bytes")]
    if name == "pattern":
        try:
            search = compile_search(value)
        except PatternError as error:  # protovalidate fails at validation time; let it
            raise UnsupportedRule(f"{where}: pattern {value!r} ({error})") from error
        return [_when(lambda v: not search(v), rule_id, f"does not match regex pattern `{value}`")]
    if name == "prefix":
        return [_when(lambda v: not v.startswith(value), rule_id, f"does not have prefix `{value}`")]
    if name == "suffix":
        return [_when(lambda v: not v.endswith(value), rule_id, f"does not have suffix `{value}`")]
    if name == "contains":
        return [_when(lambda v: value not in v, rule_id, f"does not contain substring `{value}`")]
    if name == "not_contains":
        return [_when(lambda v: value in v, rule_id, f"contains substring `{value}`")]
    if name in ("in", "not_in"):
        return [_membership(rule_id, list(value), inside=name == "in")]
    if name == "email":
        if not value:  # `email: false` asks for nothing
            return []
        return _format_checks(rule_id, "email address", lambda v: _EMAIL(v) is not None)
    if name in _FORMAT_PATTERNS:
        if not value:
            return []
        pattern, noun = _FORMAT_PATTERNS[name]
        matches = compile_search(pattern)
        return _format_checks(rule_id, noun, lambda v: bool(matches(v)))
    return []  # example, strict: no check of their own


def _format_checks(rule_id: str, noun: str, valid: Callable[[str], bool]) -> list[ValueCheck]:
    """The two rules of a string format: malformed when non-empty, and empty (its own rule id)."""
    return [
        _when(lambda v: v != "" and not valid(v), rule_id, f"must be a valid {noun}"),
        _when(lambda v: v == "", f"{rule_id}_empty", f"value is empty, which is not a valid {noun}"),
    ]


def _membership(rule_id: str, values: list[Any], *, inside: bool) -> ValueCheck:
    members = frozenset(values)
    listed = _format(values)
    if inside:
        # v == v excludes NaN, which CEL's `in` never finds (NaN != NaN).
        return _when(lambda v: not (v == v and v in members), rule_id, f"must be in list {listed}")  # noqa: PLR0124
    return _when(lambda v: v == v and v in members, rule_id, f"must not be in list {listed}")  # noqa: PLR0124


_BOUND_WORDS = {
    "gt": "greater than",
    "gte": "greater than or equal to",
    "lt": "less than",
    "lte": "less than or equal to",
}


def _number_checks(kind: str, rules: Message, where: str) -> list[ValueCheck]:
    is_float = kind in _FLOAT_KINDS
    listed = _supported_fields(rules, _FLOAT_RULES if is_float else _NUMBER_RULES, where)
    checks: list[ValueCheck] = []
    range_added = False
    for name, value in listed:
        rule_id = f"{kind}.{name}"
        if name == "const":
            checks.append(_when(_differs(value), rule_id, f"must equal {_format(value)}"))
        elif name in _BOUND_WORDS:
            if not range_added:  # lt/lte/gt/gte combine into one CEL rule
                checks.append(_range_check(kind, rules, where))
                range_added = True
        elif name in ("in", "not_in"):
            checks.append(_membership(rule_id, list(value), inside=name == "in"))
        elif name == "finite" and value:
            checks.append(_when(lambda v: math.isnan(v) or math.isinf(v), rule_id, "must be finite"))
    return checks


def _out_of_range(
    lower: str | None, upper: str | None, low: Any, high: Any, *, exclusive: bool
) -> Callable[[Any], bool]:
    """The predicate "breaks the range", one closure per shape so a check costs one call.

    Each is written as "not in range" so that NaN, which compares false with everything, fails
    every range rule, as the isNan() clauses of the CEL rules demand.
    """
    shapes: dict[tuple[str | None, str | None, bool], Callable[[Any], bool]] = {
        ("gt", None, False): lambda v: not v > low,
        ("gte", None, False): lambda v: not v >= low,
        (None, "lt", False): lambda v: not v < high,
        (None, "lte", False): lambda v: not v <= high,
        ("gt", "lt", False): lambda v: not low < v < high,
        ("gt", "lte", False): lambda v: not low < v <= high,
        ("gte", "lt", False): lambda v: not low <= v < high,
        ("gte", "lte", False): lambda v: not low <= v <= high,
        # Exclusive ranges: the lower bound is above the upper one; values outside pass.
        ("gt", "lt", True): lambda v: not (v < high or v > low),
        ("gt", "lte", True): lambda v: not (v <= high or v > low),
        ("gte", "lt", True): lambda v: not (v < high or v >= low),
        ("gte", "lte", True): lambda v: not (v <= high or v >= low),
    }
    return shapes[lower, upper, exclusive]


def _range_check(
    kind: str, rules: Any, where: str, *, key: Callable[[Any], Any] | None = None,
    show: Callable[[Any], str] = _format,
) -> ValueCheck:
    """The one range rule protovalidate evaluates for a combination of lt/lte/gt/gte.

    Rule ids and verdicts follow validate.proto: a lower bound above the upper bound means the
    *exclusive* range (``gt: 10, lt: 5`` accepts values outside [5, 10]); NaN always fails.
    ``key`` maps bounds and values to what is compared (times to microseconds), ``show`` renders
    a bound in the message.
    """
    lower = "gt" if rules.HasField("gt") else "gte" if rules.HasField("gte") else None
    upper = "lt" if rules.HasField("lt") else "lte" if rules.HasField("lte") else None
    shown_low = show(getattr(rules, lower)) if lower else ""
    shown_high = show(getattr(rules, upper)) if upper else ""
    low = getattr(rules, lower) if lower else None
    high = getattr(rules, upper) if upper else None
    if key is not None:
        low, high = (key(low) if lower else None), (key(high) if upper else None)
    if any(isinstance(bound, float) and math.isnan(bound) for bound in (low, high)):
        # The CEL rules then pass or fail in ways no sane contract relies on; leave them to CEL.
        raise UnsupportedRule(f"{where}: NaN range bound")
    if lower is None or upper is None:
        bound = lower or upper
        assert bound is not None
        rule, exclusive = bound, False
        text = f"must be {_BOUND_WORDS[bound]} {shown_low or shown_high}"
    else:
        exclusive = bool(high < low)  # type: ignore[operator]  # both bounds are set here
        joiner = "or" if exclusive else "and"
        rule = f"{lower}_{upper}" + ("_exclusive" if exclusive else "")
        text = f"must be {_BOUND_WORDS[lower]} {shown_low} {joiner} {_BOUND_WORDS[upper]} {shown_high}"
    broken = _out_of_range(lower, upper, low, high, exclusive=exclusive)
    if key is not None:
        convert = key
        compare = broken

        def broken(value: Any) -> bool:
            return compare(convert(value))

    return _when(broken, f"{kind}.{rule}", text)


# --- timestamp and duration rules ----------------------------------------------------------


def _micros(value: Any) -> int:
    """A Timestamp or Duration in whole microseconds, as protovalidate-python converts it (nanos floored)."""
    return int(value.seconds) * 1_000_000 + int(value.nanos) // 1000


def _format_timestamp(value: Any) -> str:
    """A Timestamp as protovalidate-python renders one: RFC 3339, milliseconds when it has any."""
    try:
        stamp = _EPOCH + timedelta(microseconds=_micros(value))
    except OverflowError as error:  # a bound outside years 1-9999: protovalidate cannot use it either
        raise UnsupportedRule(f"timestamp bound {value.seconds}s out of range") from error
    spec = "milliseconds" if stamp.microsecond // 1000 else "auto"
    return stamp.isoformat(timespec=spec).removesuffix("+00:00") + "Z"


def _format_duration(value: Any) -> str:
    """A Duration in seconds with its fraction ("90s", "1.5s").

    protovalidate-python 1.2 drops whole days from the text (it prints timedelta.seconds), a
    display bug; this prints the full value, and the differential test keeps its bounds under a day.
    """
    whole, micros = divmod(_micros(value), 1_000_000)
    return f"{whole + Decimal(micros) / Decimal(1_000_000):f}s"


def _now_micros() -> int:
    return _micros_of_datetime(datetime.now(UTC))


def _micros_of_datetime(moment: datetime) -> int:
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _time_membership(
    rule_id: str, values: list[Any], show: Callable[[Any], str], *, inside: bool, text: str = ""
) -> ValueCheck:
    """``in``, ``not_in`` (and ``const``, a list of one) on times, compared in microseconds."""
    members = frozenset(_micros(item) for item in values)
    listed = "[" + ", ".join(show(item) for item in values) + "]"
    if inside:
        return _when(lambda v: _micros(v) not in members, rule_id, text or f"must be in list {listed}")
    return _when(lambda v: _micros(v) in members, rule_id, text or f"must not be in list {listed}")


def _far_from_now(span: int) -> Callable[[Any], bool]:
    return lambda v: abs(_micros(v) - _now_micros()) > span


def _time_checks(kind: str, rules: Any, where: str) -> list[ValueCheck]:
    listed = _supported_fields(rules, _TIMESTAMP_RULES if kind == "timestamp" else _DURATION_RULES, where)
    show = _format_timestamp if kind == "timestamp" else _format_duration
    checks: list[ValueCheck] = []
    range_added = False
    for name, value in listed:
        rule_id = f"{kind}.{name}"
        if name == "const":
            checks.append(_time_membership(rule_id, [value], show, inside=True, text=f"must equal {show(value)}"))
        elif name in _BOUND_WORDS:
            if not range_added:
                checks.append(_range_check(kind, rules, where, key=_micros, show=show))
                range_added = True
        elif name in ("in", "not_in"):
            checks.append(_time_membership(rule_id, list(value), show, inside=name == "in"))
        elif name == "lt_now" and value:
            checks.append(_when(lambda v: _micros(v) > _now_micros(), rule_id, "must be less than now"))
        elif name == "gt_now" and value:
            checks.append(_when(lambda v: _micros(v) < _now_micros(), rule_id, "must be greater than now"))
        elif name == "within":
            text = f"must be within {_format_duration(value)} of now"
            checks.append(_when(_far_from_now(_micros(value)), rule_id, text))
    return checks


def _enum_checks(rules: validate_pb2.EnumRules, field: FieldDescriptor, where: str) -> list[ValueCheck]:
    checks: list[ValueCheck] = []
    for name, value in _supported_fields(rules, _ENUM_RULES, where):
        rule_id = f"enum.{name}"
        if name == "const":
            checks.append(_when(_differs(value), rule_id, f"must equal {value}"))
        elif name in ("in", "not_in"):
            checks.append(_membership(rule_id, list(value), inside=name == "in"))
        elif name == "defined_only" and value:
            defined = frozenset(_enum_type(field).values_by_number)
            checks.append(_when(_not_in(defined), rule_id, "value must be one of the defined enum values"))
    return checks


def scalar_checks(field: FieldDescriptor, rules: validate_pb2.FieldRules, where: str) -> list[ValueCheck]:
    """The value checks of the type-specific rules in ``rules``, for values of ``field``'s type."""
    kind = rules.WhichOneof("type")
    if kind is None:
        return []
    if kind in _TIME_TYPES:
        if field.message_type is None or field.message_type.full_name != _TIME_TYPES[kind]:
            raise UnsupportedRule(f"{where}: {kind} rules on a field of another type")
        return _time_checks(kind, getattr(rules, kind), where)
    expected = _FIELD_TYPE_OF_RULES.get(kind)
    if expected is None:
        raise UnsupportedRule(f"{where}: {kind} rules")
    if field.type != expected:  # protovalidate refuses to compile this; let it say so
        raise UnsupportedRule(f"{where}: {kind} rules on a field of type {field.type}")
    typed = getattr(rules, kind)
    if kind == "string":
        return _string_checks(typed, where)
    if kind == "enum":
        return _enum_checks(typed, field, where)
    if kind == "bool":
        return [
            _when(_differs(value), "bool.const", f"must equal {_format(value)}")
            for name, value in _supported_fields(typed, _BOOL_RULES, where)
            if name == "const"
        ]
    return _number_checks(kind, typed, where)


# --- fields --------------------------------------------------------------------------------


def _check_field_level(rules: validate_pb2.FieldRules, where: str) -> None:
    if len(unknown_fields.UnknownFieldSet(rules)) > 0:
        raise UnsupportedRule(f"{where}: unknown field rules")
    for field, _ in rules.ListFields():
        if field.is_extension:
            raise UnsupportedRule(f"{where}: predefined rule [{field.full_name}]")
        if field.name in ("cel", "cel_expression"):
            raise UnsupportedRule(f"{where}: CEL expression ({field.name})")
        if field.name not in _FIELD_LEVEL and field.containing_oneof is None:
            raise UnsupportedRule(f"{where}: FieldRules.{field.name}")
    if rules.ignore not in (validate_pb2.IGNORE_UNSPECIFIED, _IGNORE_IF_ZERO, _IGNORE_ALWAYS):
        raise UnsupportedRule(f"{where}: ignore = {rules.ignore}")


def _element_checks(
    field: FieldDescriptor, rules: validate_pb2.FieldRules, where: str
) -> tuple[list[ValueCheck], bool]:
    """Checks for a repeated item or map key/value, and whether zero values skip them."""
    _check_field_level(rules, where)
    if rules.ignore == _IGNORE_ALWAYS:
        return [], False
    # protovalidate ignores `required` on items, keys and values.
    return scalar_checks(field, rules, where), rules.ignore == _IGNORE_IF_ZERO


def _report(out: list[Violation], path: str, value: Any, checks: tuple[ValueCheck, ...]) -> None:
    for failed, problem in checks:
        if failed(value):
            out.append(Violation(path, *problem))


def subscript(field: FieldDescriptor, key: Any) -> str:
    """``name[key]`` as ``field_path`` renders a protovalidate map key (repr for strings)."""
    return f"{field.name}[{key!r}]" if isinstance(key, str) else f"{field.name}[{key}]"


def field_runner(field: FieldDescriptor, rules: validate_pb2.FieldRules, *, oneof_member: bool) -> Runner | None:
    """The runner of one field's rules (not its sub-message's), or None when it has nothing to check."""
    where = field.full_name
    _check_field_level(rules, where)
    ignore = rules.ignore
    if oneof_member and not rules.HasField("ignore"):
        ignore = _IGNORE_IF_ZERO  # at most one member of a message oneof is set
    if ignore == _IGNORE_ALWAYS:
        return None
    kind = rules.WhichOneof("type")
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        if kind not in (None, "map"):
            raise UnsupportedRule(f"{where}: {kind} rules on a map")
        return _map_runner(field, rules, ignore=ignore, where=where)
    if field.is_repeated:
        if kind not in (None, "repeated"):
            raise UnsupportedRule(f"{where}: {kind} rules on a repeated field")
        return _list_runner(field, rules, ignore=ignore, where=where)
    if kind in ("repeated", "map"):
        raise UnsupportedRule(f"{where}: {kind} rules on a singular field")
    checks = tuple(scalar_checks(field, rules, where))
    return _singular_runner(field, checks, required=rules.required, ignore_empty=ignore == _IGNORE_IF_ZERO)


def _singular_runner(
    field: FieldDescriptor, checks: tuple[ValueCheck, ...], *, required: bool, ignore_empty: bool
) -> Runner | None:
    if not checks and not required:
        return None
    name = field.name
    if field.has_presence:

        def run_present(message: Any, out: list[Violation]) -> None:
            if not message.HasField(name):
                if required:
                    out.append(Violation(name, *_REQUIRED))
                return
            value = getattr(message, name)
            for failed, problem in checks:
                if failed(value):
                    out.append(Violation(name, *problem))

        return run_present

    default = field.default_value

    def run(message: Any, out: list[Violation]) -> None:
        value = getattr(message, name)
        if value == default:
            if required:
                out.append(Violation(name, *_REQUIRED))
                return
            if ignore_empty:
                return
        for failed, problem in checks:
            if failed(value):
                out.append(Violation(name, *problem))

    return run


def _list_runner(field: FieldDescriptor, rules: validate_pb2.FieldRules, *, ignore: int, where: str) -> Runner | None:
    repeated = rules.repeated
    whole: list[ValueCheck] = []
    item_checks: tuple[ValueCheck, ...] = ()
    skip_zero_items = False
    for name, value in _supported_fields(repeated, _REPEATED_RULES, where):
        rule_id = f"repeated.{name}"
        if name == "min_items":
            whole.append(_when(_fewer_than(value), rule_id, f"must contain at least {value} item(s)"))
        elif name == "max_items":
            whole.append(_when(_more_than(value), rule_id, f"must contain no more than {value} item(s)"))
        elif name == "unique" and value:
            if field.message_type is not None:
                raise UnsupportedRule(f"{where}: repeated.unique on messages")
            whole.append(_when(lambda v: len(set(v)) != len(v), rule_id, "repeated value must contain unique items"))
        elif name == "items":
            checks, skip_zero_items = _element_checks(field, value, f"{where}[]")
            item_checks = tuple(checks)
    required = rules.required
    if not whole and not item_checks and not required:
        return None
    name = field.name
    whole_checks = tuple(whole)
    ignore_empty = ignore == _IGNORE_IF_ZERO

    def run(message: Any, out: list[Violation]) -> None:
        values = getattr(message, name)
        if not values:
            if required:
                out.append(Violation(name, *_REQUIRED))
                return
            if ignore_empty:
                return
        _report(out, name, values, whole_checks)
        if item_checks:
            for index, item in enumerate(values):
                if skip_zero_items and not item:
                    continue
                for failed, problem in item_checks:
                    if failed(item):
                        out.append(Violation(f"{name}[{index}]", *problem))

    return run


def _map_runner(field: FieldDescriptor, rules: validate_pb2.FieldRules, *, ignore: int, where: str) -> Runner | None:
    entry = _message_type(field)
    whole: list[ValueCheck] = []
    key_checks: tuple[ValueCheck, ...] = ()
    value_checks: tuple[ValueCheck, ...] = ()
    skip_zero_keys = skip_zero_values = False
    for name, value in _supported_fields(rules.map, _MAP_RULES, where):
        rule_id = f"map.{name}"
        if name == "min_pairs":
            whole.append(_when(_fewer_than(value), rule_id, f"map must be at least {value} entries"))
        elif name == "max_pairs":
            whole.append(_when(_more_than(value), rule_id, f"map must be at most {value} entries"))
        elif name == "keys":
            checks, skip_zero_keys = _element_checks(entry.fields_by_name["key"], value, f"{where}[key]")
            key_checks = tuple(checks)
        elif name == "values":
            checks, skip_zero_values = _element_checks(entry.fields_by_name["value"], value, f"{where}[value]")
            value_checks = tuple(checks)
    required = rules.required
    if not whole and not key_checks and not value_checks and not required:
        return None
    name = field.name
    whole_checks = tuple(whole)
    ignore_empty = ignore == _IGNORE_IF_ZERO

    def run(message: Any, out: list[Violation]) -> None:
        pairs = getattr(message, name)
        if not pairs:
            if required:
                out.append(Violation(name, *_REQUIRED))
                return
            if ignore_empty:
                return
        _report(out, name, pairs, whole_checks)
        if key_checks or value_checks:
            for key, value in pairs.items():
                if value_checks and not (skip_zero_values and not value):
                    _report(out, subscript(field, key), value, value_checks)
                if key_checks and not (skip_zero_keys and not key):
                    _report(out, subscript(field, key), key, key_checks)

    return run


# --- message-level rules -------------------------------------------------------------------


def _is_empty(message: Any, field: FieldDescriptor) -> bool:
    if field.has_presence:
        return not message.HasField(field.name)
    value = getattr(message, field.name)
    return len(value) == 0 if field.is_repeated else bool(value == field.default_value)


def message_oneof_runners(descriptor: Descriptor, rules: validate_pb2.MessageRules) -> tuple[list[Runner], set[str]]:
    """Runners for ``(buf.validate.message)`` and the names of the fields its oneofs cover."""
    where = descriptor.full_name
    if len(unknown_fields.UnknownFieldSet(rules)) > 0:
        raise UnsupportedRule(f"{where}: unknown message rules")
    runners: list[Runner] = []
    covered: set[str] = set()
    for field, _ in rules.ListFields():
        if field.is_extension or field.name != "oneof":
            raise UnsupportedRule(f"{where}: (buf.validate.message).{field.name}")
    for rule in rules.oneof:
        names = list(rule.fields)
        if not names or len(set(names)) != len(names) or any(n not in descriptor.fields_by_name for n in names):
            raise UnsupportedRule(f"{where}: malformed (buf.validate.message).oneof {names}")
        covered.update(names)
        runners.append(_message_oneof_runner([descriptor.fields_by_name[n] for n in names], required=rule.required))
    return runners, covered


def _message_oneof_runner(fields: list[FieldDescriptor], *, required: bool) -> Runner:
    listed = ", ".join(field.name for field in fields)
    too_many = Violation("", "message.oneof", f"only one of {listed} can be set")
    missing = Violation("", "message.oneof", f"one of {listed} must be set")

    def run(message: Any, out: list[Violation]) -> None:
        count = sum(1 for field in fields if not _is_empty(message, field))
        if count > 1:
            out.append(too_many)
        if required and count == 0:
            out.append(missing)

    return run


def oneof_runner(oneof: OneofDescriptor, rules: validate_pb2.OneofRules) -> Runner | None:
    """The runner of ``(buf.validate.oneof).required``, or None when the oneof may stay unset."""
    if len(unknown_fields.UnknownFieldSet(rules)) > 0 or any(f.is_extension for f, _ in rules.ListFields()):
        raise UnsupportedRule(f"{oneof.full_name}: unknown oneof rules")
    if not rules.required:
        return None
    name = oneof.name
    missing = Violation(name, "required", "exactly one field is required in oneof")

    def run(message: Any, out: list[Violation]) -> None:
        if message.WhichOneof(name) is None:
            out.append(missing)

    return run


def prefix_violations(out: list[Violation], start: int, element: str) -> None:
    """Put ``element`` (``set``, ``items[2]``) in front of the paths of ``out[start:]``."""
    for index in range(start, len(out)):
        violation = out[index]
        path = f"{element}.{violation.field}" if violation.field else element
        out[index] = violation._replace(field=path)


def run_all(runners: Iterable[Runner]) -> Runner:
    """One runner calling each of ``runners`` in order."""
    ordered = tuple(runners)
    if len(ordered) == 1:
        return ordered[0]

    def run(message: Any, out: list[Violation]) -> None:
        for runner in ordered:
            runner(message, out)

    return run
