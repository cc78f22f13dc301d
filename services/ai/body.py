"""What one frame of a pose recording shows: landmark smoothing, joint angles, fault features.

``Smoother`` replaces each coordinate of each landmark by the trimmed mean of a centred five-frame
window (the lowest and highest values dropped), which removes single-frame jitter without the lag
a causal filter would add to frame ranges; it costs two frames of latency.

``measure`` turns smoothed landmarks into joint angles and the features faults are judged on.
Side on, angles are measured in the image plane. Facing the camera, flexion happens along the
line of sight, so angles use the estimator's depth when it gives one, and otherwise depth from
foreshortening: a segment whose image is shorter than its full length (the longest averaged image
of it seen so far) points towards or away from the camera by ``sqrt(L^2 - l^2)``, in the
direction anatomy allows for the exercise.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from fittracker.ai.v1 import ai_pb2

from services.ai.pose import UP, RawFrame, Vec, angle_between, norm, sub

Severity: TypeAlias = ai_pb2.FaultSeverity.ValueType
FaultKind: TypeAlias = ai_pb2.FaultKind.ValueType
View: TypeAlias = ai_pb2.CameraView.ValueType
AngleName: TypeAlias = ai_pb2.JointAngle.ValueType
Exercise: TypeAlias = ai_pb2.ExerciseKind.ValueType
MINOR, MODERATE, MAJOR = ai_pb2.FAULT_SEVERITY_MINOR, ai_pb2.FAULT_SEVERITY_MODERATE, ai_pb2.FAULT_SEVERITY_MAJOR

SMOOTHING_WINDOW = 5
#: Weight of each frame in the averaged segment length depth from foreshortening is measured against.
FORESHORTENING_AVERAGING = 0.2
#: Segments imaged at 97% or more of their full length count as square to the camera, so that
#: jitter around full extension does not read as bending.
FORESHORTENING_DEAD_BAND = 0.03


class Side(NamedTuple):
    """The landmarks and angle names of one side of the body."""

    shoulder: int
    elbow: int
    wrist: int
    hip: int
    knee: int
    ankle: int
    ear: int
    knee_angle: AngleName
    hip_angle: AngleName
    elbow_angle: AngleName


LEFT = Side(
    ai_pb2.JOINT_LEFT_SHOULDER, ai_pb2.JOINT_LEFT_ELBOW, ai_pb2.JOINT_LEFT_WRIST, ai_pb2.JOINT_LEFT_HIP,
    ai_pb2.JOINT_LEFT_KNEE, ai_pb2.JOINT_LEFT_ANKLE, ai_pb2.JOINT_LEFT_EAR,
    ai_pb2.JOINT_ANGLE_LEFT_KNEE, ai_pb2.JOINT_ANGLE_LEFT_HIP, ai_pb2.JOINT_ANGLE_LEFT_ELBOW,
)
RIGHT = Side(
    ai_pb2.JOINT_RIGHT_SHOULDER, ai_pb2.JOINT_RIGHT_ELBOW, ai_pb2.JOINT_RIGHT_WRIST, ai_pb2.JOINT_RIGHT_HIP,
    ai_pb2.JOINT_RIGHT_KNEE, ai_pb2.JOINT_RIGHT_ANKLE, ai_pb2.JOINT_RIGHT_EAR,
    ai_pb2.JOINT_ANGLE_RIGHT_KNEE, ai_pb2.JOINT_ANGLE_RIGHT_HIP, ai_pb2.JOINT_ANGLE_RIGHT_ELBOW,
)


#: Joint numbers of each side (the angle names in Side share the integer range, so keep them apart).
LEFT_JOINTS = frozenset(LEFT[:7])
RIGHT_JOINTS = frozenset(RIGHT[:7])


class Depth(enum.Enum):
    """Where the third coordinate of a segment comes from."""

    IMAGE = "image"  # none: angles in the image plane (side view)
    ESTIMATOR = "estimator"  # the pose estimator's z
    FORESHORTENING = "foreshortening"  # reconstructed from segment lengths (front view, no z)


#: Segments as (from joint, to joint) getters, and the sign of their depth when reconstructed from
#: foreshortening in a front view: in a squat or hinge the knees and shoulders come towards the
#: camera (smaller z) and the ankles stay behind the knees.
_SEGMENTS: dict[str, tuple[Callable[[Side], int], Callable[[Side], int], float]] = {
    "trunk": (lambda s: s.hip, lambda s: s.shoulder, -1.0),
    "thigh": (lambda s: s.hip, lambda s: s.knee, -1.0),
    "shank": (lambda s: s.knee, lambda s: s.ankle, 1.0),
    "upper_arm": (lambda s: s.shoulder, lambda s: s.elbow, 0.0),
    "forearm": (lambda s: s.elbow, lambda s: s.wrist, 0.0),
}


@dataclass(frozen=True)
class Rules:
    """What matters for one exercise."""

    exercise: Exercise
    #: Which angle repetitions are counted on: "knee", "elbow" or "hip".
    key: str
    #: True when the resting position is the top of the key angle (squat, push-up); a deadlift
    #: rests on the floor, at the bottom of the hip angle.
    rest_high: bool
    joints: frozenset[int]
    summary: tuple[AngleName, ...]
    #: The key angle a repetition must reach at its top to count as locked out.
    lockout_deg: float
    plural: str
    hysteresis_deg: float = 20.0


def _joints(*names: str) -> frozenset[int]:
    return frozenset(getattr(side, n) for side in (LEFT, RIGHT) for n in names)


RULES: dict[Exercise, Rules] = {
    ai_pb2.EXERCISE_KIND_SQUAT: Rules(
        ai_pb2.EXERCISE_KIND_SQUAT, "knee", True, _joints("shoulder", "hip", "knee", "ankle"),
        (ai_pb2.JOINT_ANGLE_LEFT_KNEE, ai_pb2.JOINT_ANGLE_RIGHT_KNEE, ai_pb2.JOINT_ANGLE_LEFT_HIP,
         ai_pb2.JOINT_ANGLE_RIGHT_HIP, ai_pb2.JOINT_ANGLE_TRUNK_LEAN),
        lockout_deg=160.0, plural="knees",
    ),
    ai_pb2.EXERCISE_KIND_PUSH_UP: Rules(
        ai_pb2.EXERCISE_KIND_PUSH_UP, "elbow", True, _joints("shoulder", "elbow", "wrist", "hip", "knee", "ankle"),
        (ai_pb2.JOINT_ANGLE_LEFT_ELBOW, ai_pb2.JOINT_ANGLE_RIGHT_ELBOW, ai_pb2.JOINT_ANGLE_BODY_LINE),
        lockout_deg=160.0, plural="elbows",
    ),
    ai_pb2.EXERCISE_KIND_DEADLIFT: Rules(
        ai_pb2.EXERCISE_KIND_DEADLIFT, "hip", False, _joints("shoulder", "hip", "knee", "ankle", "ear"),
        (ai_pb2.JOINT_ANGLE_LEFT_HIP, ai_pb2.JOINT_ANGLE_RIGHT_HIP, ai_pb2.JOINT_ANGLE_LEFT_KNEE,
         ai_pb2.JOINT_ANGLE_RIGHT_KNEE, ai_pb2.JOINT_ANGLE_TRUNK_LEAN),
        lockout_deg=165.0, plural="hips",
    ),
}
EXERCISE_NAMES: dict[Exercise, str] = {
    ai_pb2.EXERCISE_KIND_SQUAT: "a squat",
    ai_pb2.EXERCISE_KIND_PUSH_UP: "a push-up",
    ai_pb2.EXERCISE_KIND_DEADLIFT: "a deadlift",
}


@dataclass(slots=True)
class Measure:
    """What one smoothed frame shows."""

    index: int
    time: float
    #: The key angle repetitions are counted on, in degrees.
    key: float
    left: float | None
    right: float | None
    angles: dict[int, float]
    features: dict[str, float]


class Smoother:
    """Centred trimmed-mean smoothing of landmark coordinates over SMOOTHING_WINDOW frames."""

    def __init__(self, joints: frozenset[int]) -> None:
        """Smooth only ``joints``; the others are dropped."""
        self._joints = joints
        self._window: deque[RawFrame] = deque(maxlen=SMOOTHING_WINDOW)
        self._next = 0  # the index of the next frame to emit
        self._half = SMOOTHING_WINDOW // 2

    def push(self, frame: RawFrame) -> list[RawFrame]:
        """Add a frame; return the frames whose whole window is now known."""
        self._window.append(frame)
        out = []
        while self._next <= frame.index - self._half:
            out.append(self._emit(self._next))
        return out

    def flush(self) -> list[RawFrame]:
        """The frames still waiting for their window, smoothed over what there is."""
        out = []
        last = self._window[-1].index if self._window else -1
        while self._next <= last:
            out.append(self._emit(self._next))
        return out

    def _emit(self, index: int) -> RawFrame:
        self._next = index + 1
        neighbours = [f for f in self._window if abs(f.index - index) <= self._half]
        centre = next(f for f in neighbours if f.index == index)
        points: dict[int, Vec] = {}
        for joint in self._joints & centre.points.keys():
            samples = [f.points[joint] for f in neighbours if joint in f.points]
            points[joint] = (_robust_mean([p[0] for p in samples]), _robust_mean([p[1] for p in samples]),
                             _robust_mean([p[2] for p in samples]))
        return RawFrame(index, centre.time, points)


def _robust_mean(values: list[float]) -> float:
    """The mean without the lowest and highest value once there are four or more."""
    if len(values) >= 4:
        values = sorted(values)[1:-1]
    return sum(values) / len(values)



class Geometry:
    """Segments and angles of one smoothed frame."""

    def __init__(self, points: dict[int, Vec], depth: Depth, lengths: dict[tuple[int, str], list[float]]) -> None:
        """``lengths`` holds, per segment, its averaged image length and the longest average so far."""
        self.points = points
        self._depth = depth
        self._lengths = lengths

    def segment(self, side: Side, name: str) -> Vec | None:
        """The vector of segment ``name`` on ``side``, with its depth per the depth mode."""
        start_of, end_of, sign = _SEGMENTS[name]
        a, b = self.points.get(start_of(side)), self.points.get(end_of(side))
        if a is None or b is None:
            return None
        dx, dy, dz = sub(b, a)
        if self._depth is Depth.ESTIMATOR:
            return (dx, dy, dz)
        if self._depth is Depth.IMAGE or sign == 0.0:
            return (dx, dy, 0.0)
        image_length = math.hypot(dx, dy)
        state = self._lengths.setdefault((side.hip, name), [image_length, image_length])
        # The reference is the longest *averaged* image of the segment: the plain maximum would
        # be the one frame where jitter lengthened it most, and make straight limbs look bent.
        state[0] += FORESHORTENING_AVERAGING * (image_length - state[0])
        state[1] = max(state[1], state[0])
        full = state[1] * (1 - FORESHORTENING_DEAD_BAND)
        return (dx, dy, sign * math.sqrt(max(0.0, full * full - image_length * image_length)))

    def knee(self, side: Side) -> float | None:
        """Knee angle: hip-knee-ankle, 180 straight."""
        thigh, shank = self.segment(side, "thigh"), self.segment(side, "shank")
        return None if thigh is None or shank is None else angle_between(_neg(thigh), shank)

    def hip(self, side: Side) -> float | None:
        """Hip angle: shoulder-hip-knee, 180 straight."""
        trunk, thigh = self.segment(side, "trunk"), self.segment(side, "thigh")
        return None if trunk is None or thigh is None else angle_between(trunk, thigh)

    def elbow(self, side: Side) -> float | None:
        """Elbow angle: shoulder-elbow-wrist, 180 straight."""
        upper, fore = self.segment(side, "upper_arm"), self.segment(side, "forearm")
        return None if upper is None or fore is None else angle_between(_neg(upper), fore)

    def lean(self, side: Side) -> float | None:
        """Trunk lean from vertical, 0 upright."""
        trunk = self.segment(side, "trunk")
        return None if trunk is None else angle_between(trunk, UP)

    def shank_tilt(self, side: Side) -> float | None:
        """Shin angle from vertical."""
        shank = self.segment(side, "shank")
        return None if shank is None else angle_between(_neg(shank), UP)

    def thigh_incline(self, side: Side) -> float | None:
        """The thigh's slope in degrees: positive while the hip is above the knee, 0 at parallel."""
        thigh = self.segment(side, "thigh")
        if thigh is None or norm(thigh) <= 1e-9:
            return None
        return math.degrees(math.asin(max(-1.0, min(1.0, thigh[1] / norm(thigh)))))

    def key(self, name: str, side: Side) -> float | None:
        """The angle ``name`` ("knee", "hip" or "elbow") on ``side``."""
        if name == "knee":
            return self.knee(side)
        if name == "hip":
            return self.hip(side)
        return self.elbow(side)

    def bend_below(self, origin: int, pivot: int, tip: int) -> float | None:
        """How far the pivot->tip segment turns below the line origin->pivot, in degrees.

        Measured in the image plane; positive when ``tip`` falls on the floor side of the line
        (image y grows downwards), negative when above it.
        """
        a, b, c = self.points.get(origin), self.points.get(pivot), self.points.get(tip)
        if a is None or b is None or c is None:
            return None
        line = (b[0] - a[0], b[1] - a[1], 0.0)
        rest = (c[0] - b[0], c[1] - b[1], 0.0)
        bend = angle_between(line, rest)
        if bend is None:
            return None
        downward = (-line[1], line[0]) if line[0] >= 0 else (line[1], -line[0])
        return bend if rest[0] * downward[0] + rest[1] * downward[1] >= 0 else -bend

    def valgus(self) -> float | None:
        """The larger inward knee offset of the two legs, as a share of hip width (front view).

        The offset is the knee's horizontal distance from the hip-ankle line at the knee's height:
        positive when the knee is inside the line, towards the body's midline.
        """
        left_hip, right_hip = self.points.get(LEFT.hip), self.points.get(RIGHT.hip)
        if left_hip is None or right_hip is None:
            return None
        width = abs(left_hip[0] - right_hip[0])
        if width <= 1e-6:
            return None
        middle = (left_hip[0] + right_hip[0]) / 2
        worst: float | None = None
        for side in (LEFT, RIGHT):
            hip, knee, ankle = self.points[side.hip], self.points.get(side.knee), self.points.get(side.ankle)
            if knee is None or ankle is None or abs(ankle[1] - hip[1]) <= 1e-6:
                continue
            along = (knee[1] - hip[1]) / (ankle[1] - hip[1])
            line_x = hip[0] + along * (ankle[0] - hip[0])
            outward = 1.0 if hip[0] >= middle else -1.0
            inward = (line_x - knee[0]) * outward / width
            worst = inward if worst is None else max(worst, inward)
        return worst


def _neg(v: Vec) -> Vec:
    return (-v[0], -v[1], -v[2])


def _mean(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def measure(frame: RawFrame, rules: Rules, view: View, depth: Depth, dominant: Side,
            lengths: dict[tuple[int, str], list[float]]) -> Measure | None:
    """The angles and fault features of one smoothed frame; None without the key angle."""
    geo = Geometry(frame.points, depth, lengths)
    other = RIGHT if dominant is LEFT else LEFT
    left, right = geo.key(rules.key, LEFT), geo.key(rules.key, RIGHT)
    by_side = {LEFT: left, RIGHT: right}
    if view == ai_pb2.CAMERA_VIEW_FRONT:
        key = _mean((left, right))
    else:
        key = by_side[dominant] if by_side[dominant] is not None else by_side[other]
    if key is None:
        return None
    angles: dict[int, float] = {}
    for side in (LEFT, RIGHT):
        for name, value in ((side.knee_angle, geo.knee(side)), (side.hip_angle, geo.hip(side)),
                            (side.elbow_angle, geo.elbow(side))):
            if value is not None:
                angles[name] = value
    lean = first(geo.lean(dominant), geo.lean(other))
    if lean is not None:
        angles[ai_pb2.JOINT_ANGLE_TRUNK_LEAN] = lean
    features: dict[str, float] = {}
    if view == ai_pb2.CAMERA_VIEW_FRONT:
        if rules.exercise != ai_pb2.EXERCISE_KIND_PUSH_UP:
            _put(features, "valgus", geo.valgus())
        if left is not None and right is not None:
            features["asymmetry"] = abs(left - right)
    else:
        _side_features(geo, rules, dominant, other, angles, features)
    return Measure(frame.index, frame.time, key, left, right, angles, features)


def _side_features(geo: Geometry, rules: Rules, dominant: Side, other: Side,
                   angles: dict[int, float], features: dict[str, float]) -> None:
    lean = angles.get(ai_pb2.JOINT_ANGLE_TRUNK_LEAN)
    if rules.exercise == ai_pb2.EXERCISE_KIND_SQUAT:
        _put(features, "thigh_incline", first(geo.thigh_incline(dominant), geo.thigh_incline(other)))
        shin = first(geo.shank_tilt(dominant), geo.shank_tilt(other))
        if lean is not None and shin is not None:
            features["lean_excess"] = lean - shin
    elif rules.exercise == ai_pb2.EXERCISE_KIND_PUSH_UP:
        for side in (dominant, other):
            # The hip bends off the shoulder->ankle line: the pivot is the hip, seen from the ankle.
            sag = geo.bend_below(side.ankle, side.hip, side.shoulder)
            if sag is not None:
                line = angle_between(sub(geo.points[side.shoulder], geo.points[side.hip]),
                                     sub(geo.points[side.ankle], geo.points[side.hip]))
                if line is not None:
                    angles[ai_pb2.JOINT_ANGLE_BODY_LINE] = line
                # Turning "below" from ankle->hip to hip->shoulder means the hip sits above the line.
                features["hip_sag"], features["hip_pike"] = -sag, sag
                break
    elif lean is not None:
        features["lean"] = lean
        if lean > 30.0:
            for side in (dominant, other):
                bend = geo.bend_below(side.hip, side.shoulder, side.ear)
                if bend is not None:
                    features["back_bend"] = bend
                    break


def first(*values: float | None) -> float | None:
    """The first value that is not None."""
    return next((v for v in values if v is not None), None)


def _put(features: dict[str, float], name: str, value: float | None) -> None:
    if value is not None:
        features[name] = value
