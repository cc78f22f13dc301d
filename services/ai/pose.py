"""Pose frames in: the checks the contract leaves to the service, and the geometry of landmarks.

Frames come by the thousand, so the contract does not give them protovalidate rules (see
``Keypoint`` in ai.proto); ``FrameReader`` checks them here in one pass while converting them into
plain tuples, and answers INVALID_ARGUMENT naming the field, e.g. ``frames[12].keypoints[3].x``.

Coordinates are normalised by the image's width (x) and height (y). ``FrameReader`` multiplies x
(and the estimator's depth z, which is on the scale of x) by width / height, so that one unit is
the image height in every direction and angles measured in the image are true angles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fittracker.ai.v1 import ai_pb2

from services.runtime.errors import InvalidArgument

Vec = tuple[float, float, float]

#: Landmarks under this confidence are treated as not seen (the contract's rule).
CONFIDENCE_FLOOR = 0.5
MAX_KEYPOINTS = 33
MAX_TIME_SECONDS = 3600.0
#: Violations reported for one frame at most, so a garbage frame cannot make a huge error.
MAX_VIOLATIONS = 20
_VALID_JOINTS = frozenset(v for v in ai_pb2.Joint.values() if v != ai_pb2.JOINT_UNSPECIFIED)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """One received frame: its position, its time, and its confident landmarks."""

    index: int
    time: float
    #: Joint number -> (X, Y, Z) in image heights; only landmarks at or above CONFIDENCE_FLOOR.
    points: dict[int, Vec]


class FrameReader:
    """Checks frames in arrival order and converts them; remembers the previous frame's time."""

    def __init__(self, image_width: int, image_height: int) -> None:
        """Scale x and z by width / height when both are known (a square image otherwise)."""
        self.aspect = image_width / image_height if image_width > 0 and image_height > 0 else 1.0
        self._last_time = -1.0
        self.count = 0

    def read(self, frame: ai_pb2.PoseFrame, field: str) -> RawFrame:
        """Check ``frame`` (named ``field`` in errors) and convert it; frame times must increase."""
        violations: list[tuple[str, str]] = []
        time = self._time_of(frame, field, violations)
        if len(frame.keypoints) > MAX_KEYPOINTS:
            violations.append((f"{field}.keypoints", f"must hold at most {MAX_KEYPOINTS} keypoints"))
        points: dict[int, Vec] = {}
        seen: set[int] = set()
        aspect = self.aspect
        for i, kp in enumerate(frame.keypoints):
            joint, x, y, z, confidence = kp.joint, kp.x, kp.y, kp.z, kp.confidence
            # Chained comparisons are False for NaN, so NaN is refused along with out-of-range values.
            if joint not in _VALID_JOINTS:
                violations.append((f"{field}.keypoints[{i}].joint", "must be a defined joint, not JOINT_UNSPECIFIED"))
            elif joint in seen:
                violations.append(
                    (f"{field}.keypoints[{i}].joint", f"{ai_pb2.Joint.Name(joint)} appears more than once")
                )
            seen.add(joint)
            if not -1.0 <= x <= 2.0:
                violations.append((f"{field}.keypoints[{i}].x", "must be between -1 and 2"))
            if not -1.0 <= y <= 2.0:
                violations.append((f"{field}.keypoints[{i}].y", "must be between -1 and 2"))
            if not -10.0 <= z <= 10.0:
                violations.append((f"{field}.keypoints[{i}].z", "must be between -10 and 10"))
            if not 0.0 <= confidence <= 1.0:
                violations.append((f"{field}.keypoints[{i}].confidence", "must be between 0 and 1"))
            if len(violations) >= MAX_VIOLATIONS:
                break
            if confidence >= CONFIDENCE_FLOOR:
                points[joint] = (x * aspect, y, z * aspect)
        if violations:
            raise InvalidArgument(violations)
        self._last_time = time
        index = self.count
        self.count += 1
        return RawFrame(index, time, points)

    def _time_of(self, frame: ai_pb2.PoseFrame, field: str, violations: list[tuple[str, str]]) -> float:
        name = f"{field}.time_offset"
        if not frame.HasField("time_offset"):
            violations.append((name, "is required"))
            return self._last_time
        offset = frame.time_offset
        if not 0 <= offset.nanos < 1_000_000_000:
            violations.append((name, "nanos must be between 0 and 999999999"))
            return self._last_time
        time = offset.seconds + offset.nanos / 1e9
        if not 0.0 <= time <= MAX_TIME_SECONDS:
            violations.append((name, "must be between 0 and 1 hour"))
        elif time <= self._last_time:
            violations.append((name, f"must be later than the previous frame's ({self._last_time:.3f} s)"))
        return time


# --- vector geometry --------------------------------------------------------------------------


def sub(a: Vec, b: Vec) -> Vec:
    """``a - b``."""
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def dot(a: Vec, b: Vec) -> float:
    """The dot product."""
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def norm(a: Vec) -> float:
    """The length."""
    return math.sqrt(dot(a, a))


def angle_between(u: Vec, v: Vec) -> float | None:
    """The angle between two vectors in degrees, 0 to 180; None when one has no length."""
    lengths = norm(u) * norm(v)
    if lengths <= 1e-9:
        return None
    return math.degrees(math.acos(max(-1.0, min(1.0, dot(u, v) / lengths))))


#: Straight up in image coordinates (y grows downwards).
UP: Vec = (0.0, -1.0, 0.0)
