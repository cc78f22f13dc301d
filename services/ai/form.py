"""Form analysis from pose keypoints: joint angles, repetitions and faults, one frame at a time.

The same ``FormAnalyzer`` serves AnalyzeForm (all frames, then ``finish``) and StreamFormAnalysis
(a snapshot after each completed repetition), so both give the same answer for the same frames,
and memory stays bounded however long a stream runs: only the current repetition's frames are
kept, finished repetitions are reduced to their summary and faults.

The pipeline, per frame:

1. ``FrameReader`` (pose.py) checks the frame and keeps the landmarks seen with confidence 0.5 or
   more, in aspect-corrected units.
2. The camera view is the configured one, or inferred from the first frames: facing the camera the
   shoulders are about as far apart as the trunk is long (a ratio near 0.8); side on they overlap.
   The same frames decide which side of the body the camera sees better.
3. ``Smoother`` and ``measure`` (body.py): smoothed landmarks, joint angles, fault features.
4. ``RepCounter`` (reps.py): a hysteresis state machine on the key angle counts repetitions.
5. ``judge`` (faults.py): each completed repetition is checked for the faults its exercise and
   view can show, and the score follows from them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from fittracker.ai.v1 import ai_pb2
from google.protobuf.duration_pb2 import Duration

from services.ai.body import (
    EXERCISE_NAMES,
    LEFT,
    LEFT_JOINTS,
    RIGHT,
    RIGHT_JOINTS,
    RULES,
    Depth,
    Measure,
    Rules,
    Side,
    Smoother,
    View,
    first,
    measure,
)
from services.ai.faults import FoundFault, RepResult, judge, score
from services.ai.pose import FrameReader, RawFrame, Vec
from services.ai.reps import RepCounter, RepFrames
from services.runtime.errors import FailedPrecondition

#: Frames the camera view is inferred from when the config leaves it unspecified.
VIEW_SAMPLE_FRAMES = 15
#: ...but no more frames than this are held back waiting for enough usable ones.
VIEW_MAX_PENDING = 30
#: Facing the camera, shoulder width / trunk length is about 0.8; side on it is near 0.
FRONT_VIEW_RATIO = 0.45
#: At least this share of the frames must show the exercise's landmarks.
MIN_USABLE_SHARE = 0.5


@dataclass
class AngleStats:
    """Running minimum, maximum and mean of one angle."""

    low: float = math.inf
    high: float = -math.inf
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        """Count one value."""
        self.low = min(self.low, value)
        self.high = max(self.high, value)
        self.total += value
        self.count += 1


@dataclass
class FormAnalyzer:
    """Analyses one recording frame by frame."""

    config: ai_pb2.FormAnalysisConfig
    reader: FrameReader = field(init=False)
    rules: Rules = field(init=False)
    view: View = field(init=False)
    frame_count: int = 0
    skipped: int = 0
    reps: list[RepResult] = field(default_factory=list)
    faults: list[FoundFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Prepare the pipeline; the view may still have to be inferred."""
        self.reader = FrameReader(self.config.image_width, self.config.image_height)
        self.rules = RULES[self.config.exercise]
        self.view = self.config.camera_view
        self._pending: list[RawFrame] = []
        self._smoother = Smoother(self.rules.joints)
        self._counter = RepCounter(self.rules.hysteresis_deg, self.rules.rest_high)
        self._lengths: dict[tuple[int, str], list[float]] = {}
        self._stats: dict[int, AngleStats] = {}
        self._depth = Depth.IMAGE
        self._dominant = LEFT
        self._ready = False

    def add(self, frame: ai_pb2.PoseFrame, field_name: str) -> int:
        """Check and take one frame; return how many repetitions it completed."""
        raw = self.reader.read(frame, field_name)
        self.frame_count += 1
        if self._ready:
            return self._process(raw)
        self._pending.append(raw)
        if self._can_decide():
            return self._start()
        return 0

    def finish(self) -> ai_pb2.FormAnalysis:
        """The final analysis; FAILED_PRECONDITION when too few frames showed the exercise."""
        if not self._ready:
            self._start()
        for smoothed in self._smoother.flush():
            self._measure(smoothed)
        last = self._counter.finish()
        if last is not None:
            self._count(last)
        usable = self.frame_count - self.skipped
        if usable < 2 or usable < MIN_USABLE_SHARE * self.frame_count:
            raise FailedPrecondition(
                f"only {usable} of {self.frame_count} frames show the landmarks {EXERCISE_NAMES[self.rules.exercise]}"
                f" needs ({_needs(self.rules)}) with confidence 0.5 or more"
            )
        return self.analysis()

    def analysis(self) -> ai_pb2.FormAnalysis:
        """The analysis of the frames taken so far."""
        key_angle = getattr(self._dominant, f"{self.rules.key}_angle")
        reps = [
            ai_pb2.Rep(
                index=r.index, start_frame=r.start, end_frame=r.end, key_angle=key_angle,
                min_angle_deg=round(r.min_deg, 1), max_angle_deg=round(r.max_deg, 1),
                duration=_duration(r.duration),
            )
            for r in self.reps
        ]
        summaries = [
            ai_pb2.JointAngleSummary(angle=angle, min_deg=round(s.low, 1), max_deg=round(s.high, 1),
                                     mean_deg=round(s.total / s.count, 1))
            for angle in self.rules.summary
            if (s := self._stats.get(angle)) is not None and s.count
        ]
        return ai_pb2.FormAnalysis(
            exercise=self.rules.exercise,
            camera_view=self.view or ai_pb2.CAMERA_VIEW_SIDE,
            frame_count=self.frame_count,
            skipped_frame_count=self.skipped,
            rep_count=len(self.reps),
            reps=reps,
            joint_angles=summaries,
            faults=[f.to_proto() for f in sorted(self.faults, key=lambda f: (f.start, f.kind))],
            score=score(self.faults, len(self.reps)),
        )

    # --- internals ---

    def _can_decide(self) -> bool:
        # Even with the view configured, a few frames decide which side the camera sees better.
        return len(self._pending) >= VIEW_MAX_PENDING or sum(map(_shows_trunk, self._pending)) >= VIEW_SAMPLE_FRAMES

    def _start(self) -> int:
        """Settle the view, the side and the depth mode, then run the frames held back."""
        frames, self._pending = self._pending, []
        if self.view == ai_pb2.CAMERA_VIEW_UNSPECIFIED:
            self.view = infer_view(frames)
        self._dominant = dominant_side(frames, self.rules)
        has_depth = any(p[2] != 0.0 for f in frames for p in f.points.values())
        if self.view == ai_pb2.CAMERA_VIEW_SIDE:
            self._depth = Depth.IMAGE
        elif has_depth:
            self._depth = Depth.ESTIMATOR
        elif self.rules.exercise == ai_pb2.EXERCISE_KIND_PUSH_UP:
            self._depth = Depth.IMAGE
        else:
            self._depth = Depth.FORESHORTENING
        self._ready = True
        return sum(self._process(f) for f in frames)

    def _process(self, raw: RawFrame) -> int:
        return sum(self._measure(smoothed) for smoothed in self._smoother.push(raw))

    def _measure(self, smoothed: RawFrame) -> int:
        m = measure(smoothed, self.rules, self.view, self._depth, self._dominant, self._lengths)
        if m is None:
            self.skipped += 1
            return 0
        rep = self._counter.push(m)
        if rep is None:
            return 0
        self._count(rep)
        return 1

    def _count(self, rep_frames: RepFrames) -> None:
        measures = rep_frames.frames
        if self.rules.exercise == ai_pb2.EXERCISE_KIND_DEADLIFT:
            measures = _knees_lead(rep_frames, self._dominant) + measures
        keys = [m.key for m in measures]
        rep = RepResult(
            index=len(self.reps) + 1, start=measures[0].index, end=measures[-1].index,
            min_deg=min(keys), max_deg=max(keys), duration=measures[-1].time - measures[0].time,
        )
        self.reps.append(rep)
        self.faults.extend(judge(self.rules, self.view, rep, measures))
        for m in measures:
            for angle in self.rules.summary:
                value = m.angles.get(angle)
                if value is not None:
                    self._stats.setdefault(angle, AngleStats()).add(value)


def _knees_lead(rep: RepFrames, dominant: Side) -> list[Measure]:
    """The frames before a deadlift's start in which the knees were already straightening.

    A pull whose hips shoot up straightens the knees while the hip angle stays shut, so the hip
    angle alone would start the repetition late and hide the fault.
    """
    other = RIGHT if dominant is LEFT else LEFT

    def knee(m: Measure) -> float | None:
        return first(m.angles.get(dominant.knee_angle), m.angles.get(other.knee_angle))

    values = [knee(m) for m in (*rep.before, rep.frames[0])]
    known = [v for v in values if v is not None]
    if not known:
        return []
    rest = min(known)  # the knees are most bent while the bar rests on the floor
    start = len(rep.before)
    while start > 0 and (value := values[start - 1]) is not None and value > rest + 2.0:
        start -= 1
    return rep.before[start:]


def _shows_trunk(frame: RawFrame) -> bool:
    return all(j in frame.points for j in (LEFT.shoulder, RIGHT.shoulder, LEFT.hip, RIGHT.hip))


def infer_view(frames: Sequence[RawFrame]) -> View:
    """Front when the shoulders are far apart for the trunk's length, else side."""
    ratios = []
    for f in frames:
        if not _shows_trunk(f):
            continue
        p = f.points
        width = abs(p[LEFT.shoulder][0] - p[RIGHT.shoulder][0])
        mid_shoulder = _midpoint(p[LEFT.shoulder], p[RIGHT.shoulder])
        mid_hip = _midpoint(p[LEFT.hip], p[RIGHT.hip])
        trunk = math.hypot(mid_shoulder[0] - mid_hip[0], mid_shoulder[1] - mid_hip[1])
        if trunk > 1e-6:
            ratios.append(width / trunk)
    if not ratios:
        # Without both shoulders and hips in view, the far side is hidden: the camera is side on.
        return ai_pb2.CAMERA_VIEW_SIDE
    return ai_pb2.CAMERA_VIEW_FRONT if statistics.median(ratios) > FRONT_VIEW_RATIO else ai_pb2.CAMERA_VIEW_SIDE


def dominant_side(frames: Sequence[RawFrame], rules: Rules) -> Side:
    """The side whose landmarks the estimator saw more often (the one nearer a side-on camera)."""
    left = sum(1 for f in frames for j in f.points if j in rules.joints and j in LEFT_JOINTS)
    right = sum(1 for f in frames for j in f.points if j in rules.joints and j in RIGHT_JOINTS)
    return RIGHT if right > left else LEFT


def _midpoint(a: Vec, b: Vec) -> tuple[float, float]:
    return ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)


def _needs(rules: Rules) -> str:
    return {"knee": "hip, knee and ankle", "hip": "shoulder, hip and knee", "elbow": "shoulder, elbow and wrist"}[
        rules.key
    ] + " on one side"


def _duration(seconds: float) -> Duration:
    value = Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value
