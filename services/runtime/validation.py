"""Request validation from the protovalidate rules written in the contracts.

The rules live in proto/ (``buf.validate`` options); this module only runs them and turns the
violations into an INVALID_ARGUMENT whose message and BadRequest details name each field with
its proto path (``preferences.goals.weekly_workout_target``), the names JSON clients send too.

protovalidate-python evaluates rules as CEL programs and costs milliseconds per message, too
much for a call budget of a few milliseconds. So on first use of a message type its rules are
compiled into plain-Python checks (``validation_rules``) that give the same verdicts, rule ids and
messages in microseconds. A type using a rule the compiler does not know (a CEL expression, say)
is validated by protovalidate itself, correct but slow, and the reason is logged once.
"""

from __future__ import annotations

import logging
from typing import Any

from buf.validate import validate_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from protovalidate import Validator

from services.runtime.errors import InvalidArgument
from services.runtime.validation_rules import (
    Runner,
    UnsupportedRule,
    Violation,
    field_runner,
    message_oneof_runners,
    oneof_runner,
    prefix_violations,
    run_all,
    subscript,
)

__all__ = ["RequestValidator", "Violation", "field_path"]

log = logging.getLogger("fittracker.validation")


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


def _nothing(message: Any, out: list[Violation]) -> None:
    """The runner of a type with no rules anywhere below it."""


class _Link:
    """A sub-message field to recurse into, resolved to its target's plan when compiled."""

    __slots__ = ("field", "is_map", "target")

    def __init__(self, field: FieldDescriptor, target: _Plan, *, is_map: bool) -> None:
        self.field = field
        self.target = target
        self.is_map = is_map

    def runner(self) -> Runner:
        field, target = self.field, self.target
        name = field.name
        if self.is_map:

            def run_map(message: Any, out: list[Violation]) -> None:
                for key, value in getattr(message, name).items():
                    start = len(out)
                    target.run(value, out)
                    if len(out) != start:
                        prefix_violations(out, start, subscript(field, key))

            return run_map
        if field.is_repeated:

            def run_list(message: Any, out: list[Violation]) -> None:
                for index, item in enumerate(getattr(message, name)):
                    start = len(out)
                    target.run(item, out)
                    if len(out) != start:
                        prefix_violations(out, start, f"{name}[{index}]")

            return run_list

        def run_single(message: Any, out: list[Violation]) -> None:
            if message.HasField(name):
                start = len(out)
                target.run(getattr(message, name), out)
                if len(out) != start:
                    prefix_violations(out, start, name)

        return run_single


class _Plan:
    """One message type's compiled validation: its own rule runners and its sub-message links."""

    __slots__ = ("active", "run", "steps")

    def __init__(self) -> None:
        self.steps: list[Runner | _Link] = []
        #: Whether this type or anything below it has a rule; inactive links are dropped.
        self.active = False
        self.run: Runner = _nothing


class RequestValidator:
    """Checks messages against their contract rules; one instance caches the compiled rules.

    Compiled validators are cached per message descriptor (not just its full name), so a type
    from another descriptor pool with the same name cannot reuse rules that are not its own.
    """

    def __init__(self) -> None:
        """Start with an empty cache; each message type is compiled on its first check."""
        self._plans: dict[Descriptor, _Plan] = {}
        self._protovalidate: Validator | None = None

    def check(self, message: Message) -> None:
        """Raise InvalidArgument listing every violated rule of ``message``."""
        violations = self.violations(message)
        if violations:
            name = message.DESCRIPTOR.name
            raise InvalidArgument([(v.field or name, v.message or v.rule_id) for v in violations])

    def violations(self, message: Message) -> list[Violation]:
        """Every violated rule of ``message``, with field paths relative to it."""
        descriptor: Descriptor = message.DESCRIPTOR  # type: ignore[assignment]  # upb's Descriptor is this type at runtime
        plan = self._plans.get(descriptor)
        if plan is None:
            plan = self._compile(descriptor)
        out: list[Violation] = []
        plan.run(message, out)
        return out

    def _compile(self, descriptor: Descriptor) -> _Plan:
        """Compile ``descriptor`` and every type reachable from it that is not compiled yet.

        The new plans are published only once complete: a plan still being built runs nothing,
        and another thread must not validate with it.
        """
        new: dict[Descriptor, _Plan] = {}
        root = self._plan(descriptor, new)
        # A type is active when it or any type below it has rules; message graphs may be
        # recursive, so iterate to a fixed point instead of recursing.
        changed = True
        while changed:
            changed = False
            for plan in new.values():
                if not plan.active and any(isinstance(s, _Link) and s.target.active for s in plan.steps):
                    plan.active = changed = True
        for plan in new.values():
            runners = [
                step if not isinstance(step, _Link) else step.runner()
                for step in plan.steps
                if not isinstance(step, _Link) or step.target.active
            ]
            plan.run = run_all(runners) if runners else _nothing
        self._plans.update(new)
        return root

    def _plan(self, descriptor: Descriptor, new: dict[Descriptor, _Plan]) -> _Plan:
        plan = self._plans.get(descriptor) or new.get(descriptor)
        if plan is not None:
            return plan
        plan = new[descriptor] = _Plan()  # before recursing: a type may contain itself
        try:
            steps = _steps(descriptor)
        except UnsupportedRule as rule:
            plan.steps = [self._fallback(descriptor, str(rule))]
            plan.active = True
            return plan
        for step in steps:
            if isinstance(step, FieldDescriptor):
                target_type, is_map = _sub_message(step)
                assert target_type is not None  # _steps lists message-valued fields only
                plan.steps.append(_Link(step, self._plan(target_type, new), is_map=is_map))
            else:
                plan.steps.append(step)
                plan.active = True
        return plan

    def _fallback(self, descriptor: Descriptor, reason: str) -> Runner:
        """A runner asking protovalidate, for a type whose rules are not all compilable."""
        log.warning(
            "validating %s with protovalidate (slow): %s has no compiled equivalent",
            descriptor.full_name, reason,
            extra={"fields": {"message_type": descriptor.full_name, "rule": reason}},
        )

        def run(message: Any, out: list[Violation]) -> None:
            for violation in self._oracle().collect_violations(message):
                proto = violation.proto
                out.append(Violation(field_path(proto.field), proto.rule_id, proto.message))

        return run

    def _oracle(self) -> Validator:
        if self._protovalidate is None:
            self._protovalidate = Validator()  # type: ignore[no-untyped-call]  # protovalidate 1.x is unannotated
        return self._protovalidate


def _steps(descriptor: Descriptor) -> list[Runner | FieldDescriptor]:
    """The rule runners of ``descriptor`` in protovalidate's order; fields are sub-messages to visit.

    Raises UnsupportedRule when any rule of the type itself cannot be compiled.
    """
    steps: list[Runner | FieldDescriptor] = []
    covered: set[str] = set()
    options = descriptor.GetOptions()
    if options.HasExtension(validate_pb2.message):
        runners, covered = message_oneof_runners(descriptor, options.Extensions[validate_pb2.message])
        steps.extend(runners)
    for oneof in descriptor.oneofs:
        oneof_options = oneof.GetOptions()
        if oneof_options.HasExtension(validate_pb2.oneof):
            runner = oneof_runner(oneof, oneof_options.Extensions[validate_pb2.oneof])
            if runner is not None:
                steps.append(runner)
    for field in descriptor.fields:
        field_options = field.GetOptions()
        if field_options.HasExtension(validate_pb2.field):
            rules = field_options.Extensions[validate_pb2.field]
            if rules.ignore == validate_pb2.IGNORE_ALWAYS:
                continue  # neither its rules nor its sub-message's
            runner = field_runner(field, rules, oneof_member=field.name in covered)
            if runner is not None:
                steps.append(runner)
            if rules.repeated.items.ignore == validate_pb2.IGNORE_ALWAYS:
                continue
        if field.message_type is not None and _sub_message(field)[0] is not None:
            steps.append(field)
    return steps


def _sub_message(field: FieldDescriptor) -> tuple[Descriptor | None, bool]:
    """The message type validated below ``field`` (a map's value type), and whether it is a map.

    The type is None for maps of scalars.
    """
    entry = field.message_type
    assert entry is not None
    if entry.GetOptions().map_entry:
        return entry.fields_by_name["value"].message_type, True
    return entry, False
