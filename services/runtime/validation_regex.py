r"""RE2 patterns, as ``(buf.validate.field).string.pattern`` means them, run at Python ``re`` speed.

protovalidate matches patterns with RE2: linear time, ``$`` only at the very end of the text,
``\d``/``\w``/``\s`` ASCII only. The ``re2`` module has those semantics but costs about 4 µs a
call in its Python binding, twenty times Python's ``re`` on our resource-name patterns. So a
pattern is translated to an equivalent ``re`` pattern when it lies in a subset where the two
engines provably agree *and* Python's backtracking cannot blow up:

* every top-level alternative is anchored with ``^`` (so only one start position is tried);
* groups are plain sequences (no quantifier, no ``|`` inside), so they flatten away;
* every variable-length repetition is followed by the end of its alternative, ``$``, or a
  mandatory character set disjoint from its own, so a match attempt never has more than one way
  to split the text and Python's matcher stays linear;
* only ASCII literals, ranges and the escapes ``\d \w \s`` (and negations) are used.

Any other pattern keeps running on ``re2`` itself: correct, only slower.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

import re2  # type: ignore[import-untyped]  # google-re2 ships no type information

#: A compiled pattern's test: truthy when the pattern matches somewhere in the text.
Matcher = Callable[[str], object]
#: What ``compile_search`` raises for a pattern RE2 rejects.
PatternError: type[Exception] = re2.error

_ASCII = frozenset(range(128))
_DIGITS = frozenset(range(ord("0"), ord("9") + 1))
_WORD = _DIGITS | frozenset(map(ord, string.ascii_letters + "_"))
# RE2's \s is [\t\n\f\r ] (no \v), unlike Python's.
_SPACE = frozenset(map(ord, "\t\n\f\r "))
_CLASS_ESCAPES = {"d": _DIGITS, "w": _WORD, "s": _SPACE}
_CONTROL_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
#: RE2 repetition limit; larger counts are a compile error there.
_MAX_REPEAT = 1000


class _NotTranslatable(Exception):
    """The pattern is outside the subset where ``re`` is known to behave like RE2."""


@dataclass(frozen=True)
class _CharSet:
    """A set of characters: an ASCII subset, plus every non-ASCII character when ``non_ascii``."""

    ascii: frozenset[int]
    non_ascii: bool

    def negated(self) -> _CharSet:
        return _CharSet(_ASCII - self.ascii, not self.non_ascii)

    def disjoint(self, other: _CharSet) -> bool:
        return not (self.ascii & other.ascii) and not (self.non_ascii and other.non_ascii)

    def to_python(self) -> str:
        if not self.non_ascii:
            if len(self.ascii) == 1:
                return _escape(next(iter(self.ascii)))
            return "[" + _ranges(self.ascii) + "]"
        rest = _ASCII - self.ascii
        if not rest:  # every character
            return "[\\x00-\\U0010ffff]"
        return "[^" + _ranges(rest) + "]"


def _ranges(codes: frozenset[int]) -> str:
    """Class members as compact ``a-z`` runs."""
    runs: list[str] = []
    ordered = sorted(codes)
    start = previous = ordered[0]
    for code in [*ordered[1:], -2]:
        if code != previous + 1:
            runs.append(_escape(start) if start == previous else f"{_escape(start)}-{_escape(previous)}")
            start = code
        previous = code
    return "".join(runs)


@dataclass(frozen=True)
class _Repeat:
    """A character set repeated between ``low`` and ``high`` times."""

    chars: _CharSet
    low: int
    high: int | None  # None: unbounded


_START = "start"
_END = "end"
_Element = _Repeat | str  # a repetition, or one of the anchors above


def _escape(code: int) -> str:
    char = chr(code)
    if char.isalnum():
        return char
    if 0x20 < code < 0x7F:
        return "\\" + char
    return f"\\x{code:02x}"


class _Parser:
    """A recursive-descent reader of the translatable RE2 subset."""

    def __init__(self, pattern: str) -> None:
        self._text = pattern
        self._pos = 0

    def parse(self) -> list[list[_Element]]:
        alternatives = self._alternatives(top=True)
        if self._pos != len(self._text):
            raise _NotTranslatable("unbalanced parenthesis")
        return alternatives

    def _peek(self) -> str:
        return self._text[self._pos] if self._pos < len(self._text) else ""

    def _take(self) -> str:
        char = self._peek()
        if not char:
            raise _NotTranslatable("unexpected end of pattern")
        self._pos += 1
        return char

    def _alternatives(self, *, top: bool) -> list[list[_Element]]:
        alternatives = [self._sequence()]
        while self._peek() == "|":
            if not top:
                raise _NotTranslatable("alternation inside a group")
            self._pos += 1
            alternatives.append(self._sequence())
        return alternatives

    def _sequence(self) -> list[_Element]:
        elements: list[_Element] = []
        while self._peek() not in ("", "|", ")"):
            char = self._take()
            if char == "^":
                elements.append(_START)
                continue
            if char == "$":
                elements.append(_END)
                continue
            if char == "(":
                elements.extend(self._group())
                continue
            if char == "\\" and self._peek() in ("A", "z"):
                elements.append(_START if self._take() == "A" else _END)
                continue
            chars = self._atom(char)
            low, high = self._quantifier()
            elements.append(_Repeat(chars, low, high))
        return elements

    def _group(self) -> list[_Element]:
        if self._peek() == "?":
            self._pos += 1
            if self._take() != ":":
                raise _NotTranslatable("flags or named groups")
        inner = self._alternatives(top=False)
        if self._take() != ")":
            raise _NotTranslatable("unbalanced parenthesis")
        if self._peek() in ("*", "+", "?", "{"):
            raise _NotTranslatable("repeated group")
        return inner[0]

    def _atom(self, char: str) -> _CharSet:
        if char == ".":
            return _CharSet(_ASCII - {ord("\n")}, True)
        if char == "[":
            return self._class()
        if char == "\\":
            return self._escape(in_class=False)
        if char in "*+?{}]" or ord(char) > 0x7F:
            raise _NotTranslatable(f"literal {char!r}")
        return _CharSet(frozenset({ord(char)}), False)

    def _escape(self, *, in_class: bool) -> _CharSet:
        char = self._take()
        if char.lower() in _CLASS_ESCAPES:
            chars = _CharSet(_CLASS_ESCAPES[char.lower()], False)
            if char.isupper():
                if in_class:
                    raise _NotTranslatable("negated class escape inside a class")
                return chars.negated()
            return chars
        if char in _CONTROL_ESCAPES:
            return _CharSet(frozenset({ord(_CONTROL_ESCAPES[char])}), False)
        if char in string.punctuation:
            return _CharSet(frozenset({ord(char)}), False)
        raise _NotTranslatable(f"escape \\{char}")

    def _class(self) -> _CharSet:
        negated = self._peek() == "^"
        if negated:
            self._pos += 1
        members: set[int] = set()
        first = True
        while first or self._peek() != "]":
            first = False
            low = self._class_char()
            if isinstance(low, _CharSet):
                if self._peek() == "-" and self._text[self._pos + 1 : self._pos + 2] != "]":
                    raise _NotTranslatable("range from a class escape")
                members |= low.ascii
                continue
            if self._peek() == "-" and self._text[self._pos + 1 : self._pos + 2] not in ("]", ""):
                self._pos += 1
                high = self._class_char()
                if isinstance(high, _CharSet) or high < low:
                    raise _NotTranslatable("bad range")
                members.update(range(low, high + 1))
            else:
                members.add(low)
        self._pos += 1
        chars = _CharSet(frozenset(members), False)
        return chars.negated() if negated else chars

    def _class_char(self) -> int | _CharSet:
        char = self._take()
        if char == "\\":
            escaped = self._escape(in_class=True)
            return next(iter(escaped.ascii)) if len(escaped.ascii) == 1 else escaped
        if char == "[" or ord(char) > 0x7F:
            raise _NotTranslatable(f"class member {char!r}")
        return ord(char)

    def _quantifier(self) -> tuple[int, int | None]:
        char = self._peek()
        bounds: tuple[int, int | None]
        if char == "*":
            bounds = (0, None)
        elif char == "+":
            bounds = (1, None)
        elif char == "?":
            bounds = (0, 1)
        elif char == "{":
            match = re.compile(r"\{(\d+)(,(\d*))?\}").match(self._text, self._pos)
            if match is None:
                raise _NotTranslatable("literal brace")
            low = int(match[1])
            high = low if match[2] is None else (int(match[3]) if match[3] else None)
            self._pos = match.end() - 1
            bounds = (low, high)
        else:
            return 1, 1
        self._pos += 1
        if self._peek() == "?":  # laziness changes which match is found, not whether one is
            self._pos += 1
        return bounds


def _check_linear(alternative: list[_Element]) -> None:
    """Refuse sequences where Python's backtracking could try more than one split of the text."""
    if not alternative or alternative[0] != _START:
        raise _NotTranslatable("unanchored alternative")
    body = alternative[1:]
    for index, element in enumerate(body):
        if element == _START:
            raise _NotTranslatable("^ inside the pattern")
        if element == _END:
            if index != len(body) - 1:
                raise _NotTranslatable("$ inside the pattern")
            continue
        assert isinstance(element, _Repeat)
        if element.high is not None and element.high > _MAX_REPEAT:
            raise _NotTranslatable("repetition above RE2's limit")
        if element.high == element.low:
            continue
        following = body[index + 1] if index + 1 < len(body) else _END
        if following == _END:
            continue
        if not (isinstance(following, _Repeat) and following.low >= 1 and following.chars.disjoint(element.chars)):
            raise _NotTranslatable("repetition followed by an overlapping or optional element")


def _to_python(alternatives: list[list[_Element]]) -> str:
    rendered: list[str] = []
    for alternative in alternatives:
        parts: list[str] = []
        for element in alternative:
            if element == _START:
                parts.append("^")
            elif element == _END:
                parts.append(r"\Z")  # RE2's $ never matches before a final newline
            else:
                assert isinstance(element, _Repeat)
                high = "" if element.high is None else str(element.high)
                count = "" if (element.low, element.high) == (1, 1) else f"{{{element.low},{high}}}"
                parts.append(element.chars.to_python() + count)
        rendered.append("".join(parts))
    return "|".join(rendered)


def translate(pattern: str) -> str | None:
    """The Python ``re`` pattern equivalent to RE2 ``pattern``, or None when none is known to be."""
    try:
        alternatives = _Parser(pattern).parse()
        for alternative in alternatives:
            _check_linear(alternative)
    except _NotTranslatable:
        return None
    return _to_python(alternatives)


def compile_search(pattern: str) -> Matcher:
    """A function telling whether RE2 ``pattern`` matches anywhere in a text, as CEL ``matches`` does.

    Raises ``PatternError`` when RE2 itself rejects the pattern.
    """
    engine = re2.compile(pattern)
    translated = translate(pattern)
    if translated is None:
        search: Matcher = engine.search
        return search
    # Every alternative starts with ^, so an anchored match is the same as a search.
    return re.compile(translated).match
