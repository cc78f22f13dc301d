"""Judging one repetition: the faults its exercise and camera view can show, and the score.

Side on: squat depth (hips below knees), forward lean (trunk against shins), lockout; push-up
depth (elbows to 90 degrees), hip line (sagging or piking off the shoulder-ankle line), lockout;
deadlift rounded back (head and upper back dropping below the hip-shoulder line), hips rising
first (the back tipping over early in the pull), lockout. Facing the camera: knee valgus and
left-right asymmetry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fittracker.ai.v1 import ai_pb2

from services.ai.body import FaultKind, Measure, Rules, Severity, View

MINOR, MODERATE, MAJOR = ai_pb2.FAULT_SEVERITY_MINOR, ai_pb2.FAULT_SEVERITY_MODERATE, ai_pb2.FAULT_SEVERITY_MAJOR
#: A fault must show on at least this many frames, so a single bad estimate does not count.
MIN_FAULT_FRAMES = 2
#: What each fault costs the score per repetition, by severity, before its length is weighed in.
SCORE_PENALTY: dict[Severity, float] = {MINOR: 10.0, MODERATE: 25.0, MAJOR: 45.0}


@dataclass(frozen=True)
class FoundFault:
    """A fault over a span of frames of one repetition."""

    kind: FaultKind
    start: int
    end: int
    rep_index: int
    severity: Severity
    message: str
    #: The share of the repetition's frames the fault covers, 0 to 1, for the score.
    share: float

    def to_proto(self) -> ai_pb2.FormFault:
        """The contract's message."""
        return ai_pb2.FormFault(
            kind=self.kind, start_frame=self.start, end_frame=self.end, rep_index=self.rep_index,
            severity=self.severity, message=self.message,
        )


@dataclass(frozen=True)
class RepResult:
    """One counted repetition."""

    index: int
    start: int
    end: int
    min_deg: float
    max_deg: float
    duration: float


def _grade(value: float, moderate_from: float, major_from: float) -> Severity:
    if value >= major_from:
        return MAJOR
    return MODERATE if value >= moderate_from else MINOR


def _span(measures: Sequence[Measure], test: Callable[[Measure], bool]) -> tuple[int, int] | None:
    """First and last frame passing ``test``; None when fewer than MIN_FAULT_FRAMES pass."""
    hits = [m.index for m in measures if test(m)]
    if len(hits) < MIN_FAULT_FRAMES:
        return None
    return hits[0], hits[-1]


class _Judge:
    """Finds the faults of one repetition."""

    def __init__(self, rules: Rules, view: View, rep: RepResult, measures: Sequence[Measure]) -> None:
        self.rules, self.view, self.rep, self.measures = rules, view, rep, measures
        self.faults: list[FoundFault] = []
        self._frames = max(1, rep.end - rep.start + 1)

    def add(self, kind: FaultKind, span: tuple[int, int] | None, severity: Severity, message: str) -> None:
        if span is None:
            return
        share = min(1.0, (span[1] - span[0] + 1) / self._frames)
        self.faults.append(FoundFault(kind, span[0], span[1], self.rep.index, severity, message, share))

    def feature(self, name: str, threshold: float, kind: FaultKind, moderate_from: float, major_from: float,
                message: Callable[[float], str], within: Sequence[Measure] | None = None) -> None:
        """A fault wherever feature ``name`` exceeds ``threshold``, graded by its worst value."""
        frames = self.measures if within is None else within
        span = _span(frames, lambda m: m.features.get(name, -math.inf) > threshold)
        if span is not None:
            worst = max(m.features[name] for m in frames if name in m.features)
            self.add(kind, span, _grade(worst, moderate_from, major_from), message(worst))

    def far_end(self, margin: float = 10.0) -> list[Measure]:
        """The frames near the far end of the repetition: the bottom of a squat, the lockout of a deadlift."""
        if self.rules.rest_high:
            return [m for m in self.measures if m.key <= self.rep.min_deg + margin]
        return [m for m in self.measures if m.key >= self.rep.max_deg - margin]

    def lockout(self, top: float, frames: Sequence[Measure]) -> None:
        """An incomplete lockout when the top of the repetition stays under the exercise's lockout angle."""
        if top >= self.rules.lockout_deg or not frames:
            return
        cue = {
            "knees": "Stand up tall at the top",
            "elbows": "Push all the way up until your arms are straight",
            "hips": "Finish standing tall with your hips through",
        }[self.rules.plural]
        self.add(
            ai_pb2.FAULT_KIND_INCOMPLETE_LOCKOUT,
            (frames[0].index, frames[-1].index),
            _grade(self.rules.lockout_deg - top, 15.0, 30.0),
            f"{cue}: your {self.rules.plural} reached only {top:.0f} degrees.",
        )


def judge(rules: Rules, view: View, rep: RepResult, measures: Sequence[Measure]) -> list[FoundFault]:
    """The faults of one repetition, for its exercise and what the camera view can show."""
    j = _Judge(rules, view, rep, measures)
    if view == ai_pb2.CAMERA_VIEW_FRONT:
        if rules.exercise != ai_pb2.EXERCISE_KIND_PUSH_UP:
            j.feature(
                "valgus", 0.15, ai_pb2.FAULT_KIND_KNEE_VALGUS, 0.3, 0.5,
                lambda v: f"Push your knees out over your toes: they caved in by {v * 100:.0f}% of your hip width.",
                within=[m for m in measures if m.key < 165.0 or not rules.rest_high],
            )
        j.feature(
            "asymmetry", 15.0, ai_pb2.FAULT_KIND_ASYMMETRY, 25.0, 35.0,
            lambda v: f"Move both sides evenly: your left and right {rules.plural} differed by {v:.0f} degrees.",
        )
    elif rules.exercise == ai_pb2.EXERCISE_KIND_SQUAT:
        _squat_side(j)
    elif rules.exercise == ai_pb2.EXERCISE_KIND_PUSH_UP:
        _push_up_side(j)
    else:
        _deadlift_side(j)
    return sorted(j.faults, key=lambda f: (f.start, f.kind))


#: Allowances for landmark placement: the hip landmark sits above the hip crease the depth rule
#: is about, and estimators place elbows a few degrees off.
SQUAT_DEPTH_ALLOWANCE_DEG = 5.0
PUSH_UP_DEPTH_DEG = 95.0


def _end_top(j: _Judge) -> list[Measure]:
    """The frames of the final rise that are within 5 degrees of the repetition's end."""
    end_key = j.measures[-1].key
    frames: list[Measure] = []
    for m in reversed(j.measures):
        if m.key < end_key - 5.0:
            break
        frames.append(m)
    return frames[::-1]


def _squat_side(j: _Judge) -> None:
    inclines = [m.features["thigh_incline"] for m in j.measures if "thigh_incline" in m.features]
    if inclines and min(inclines) > SQUAT_DEPTH_ALLOWANCE_DEG:
        deepest = min(inclines)
        bottom = j.far_end()
        j.add(
            ai_pb2.FAULT_KIND_SHALLOW_DEPTH,
            (bottom[0].index, bottom[-1].index),
            _grade(deepest, 15.0, 30.0),
            f"Squat until your hips are below your knees: your thighs stayed {deepest:.0f} degrees above parallel.",
        )
    j.feature(
        "lean_excess", 25.0, ai_pb2.FAULT_KIND_EXCESSIVE_FORWARD_LEAN, 35.0, 45.0,
        lambda v: f"Keep your chest up: your trunk leaned {v:.0f} degrees further forward than your shins.",
    )
    top = _end_top(j)
    j.lockout(max(m.key for m in top), top)


def _push_up_side(j: _Judge) -> None:
    if j.rep.min_deg > PUSH_UP_DEPTH_DEG:
        bottom = j.far_end()
        j.add(
            ai_pb2.FAULT_KIND_SHALLOW_DEPTH,
            (bottom[0].index, bottom[-1].index),
            _grade(j.rep.min_deg - 90.0, 20.0, 40.0),
            f"Lower your chest until your elbows bend to 90 degrees: they stopped at {j.rep.min_deg:.0f}.",
        )
    j.feature(
        "hip_sag", 10.0, ai_pb2.FAULT_KIND_HIPS_SAGGING, 20.0, 30.0,
        lambda v: f"Brace your core and squeeze your glutes: your hips sagged {v:.0f} degrees below the "
        "line from shoulders to ankles.",
    )
    j.feature(
        "hip_pike", 15.0, ai_pb2.FAULT_KIND_HIPS_PIKING, 25.0, 35.0,
        lambda v: f"Lower your hips into one line from shoulders to ankles: they piked {v:.0f} degrees above it.",
    )
    top = _end_top(j)
    j.lockout(max(m.key for m in top), top)


def _deadlift_side(j: _Judge) -> None:
    j.feature(
        "back_bend", 20.0, ai_pb2.FAULT_KIND_ROUNDED_BACK, 30.0, 40.0,
        lambda v: f"Keep your back flat, chest up and shoulders back: your upper back and head dropped "
        f"{v:.0f} degrees below the line of your hips and shoulders.",
    )
    lockout_pos = max(range(len(j.measures)), key=lambda i: j.measures[i].key)
    midway = (j.rep.min_deg + j.rep.max_deg) / 2
    early: list[Measure] = []
    for m in j.measures[: lockout_pos + 1]:
        if m.key >= midway:
            break
        early.append(m)
    leans = [m for m in early if "lean" in m.features]
    if leans:
        start_lean = leans[0].features["lean"]
        for m in leans:  # the gain only means something within this repetition, so it is added here
            m.features["lean_gain"] = m.features["lean"] - start_lean
        j.feature(
            "lean_gain", 10.0, ai_pb2.FAULT_KIND_HIPS_RISE_FIRST, 20.0, 30.0,
            lambda v: f"Push the floor away and raise hips and shoulders together: your back tipped {v:.0f} "
            "degrees further over as your hips shot up.",
            within=leans,
        )
    top = j.far_end(margin=5.0)
    j.lockout(j.rep.max_deg, top)


def score(faults: Iterable[FoundFault], rep_count: int) -> int:
    """100 minus the per-repetition cost of the faults, each weighed by severity and length."""
    if rep_count == 0:
        return 0
    cost = sum(SCORE_PENALTY[f.severity] * (0.5 + 0.5 * f.share) for f in faults) / rep_count
    return max(0, min(100, round(100 - cost)))
