"""Synthetic pose recordings from a 2D stick-figure model with known answers.

A body is a chain of rigid segments (shank, thigh, trunk, neck; upper arm, forearm) whose angles
follow a raised cosine per repetition, so the number of repetitions, their frame ranges and the
depth, valgus, lean and hip line at every frame are known exactly. The figure is placed in a
world frame (lateral, up, forward; metres), photographed by a side-on or front-facing camera onto
a 1280x720 image, and normalised the way a pose estimator reports landmarks (x by the width, y by
the height), optionally with seeded Gaussian jitter.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fittracker.ai.v1 import ai_pb2
from google.protobuf.duration_pb2 import Duration

World = tuple[float, float, float]  # lateral (+ = the person's left), up, forward (the way they face)

WIDTH, HEIGHT = 1280, 720
PIXELS_PER_METRE = 330.0
SHANK, THIGH, TRUNK, NECK = 0.45, 0.45, 0.55, 0.22
UPPER_ARM, FOREARM = 0.30, 0.27
HIP_WIDTH, SHOULDER_WIDTH, STANCE = 0.32, 0.38, 0.40

L, R = "left", "right"
JOINTS = {
    (L, "shoulder"): ai_pb2.JOINT_LEFT_SHOULDER, (R, "shoulder"): ai_pb2.JOINT_RIGHT_SHOULDER,
    (L, "elbow"): ai_pb2.JOINT_LEFT_ELBOW, (R, "elbow"): ai_pb2.JOINT_RIGHT_ELBOW,
    (L, "wrist"): ai_pb2.JOINT_LEFT_WRIST, (R, "wrist"): ai_pb2.JOINT_RIGHT_WRIST,
    (L, "hip"): ai_pb2.JOINT_LEFT_HIP, (R, "hip"): ai_pb2.JOINT_RIGHT_HIP,
    (L, "knee"): ai_pb2.JOINT_LEFT_KNEE, (R, "knee"): ai_pb2.JOINT_RIGHT_KNEE,
    (L, "ankle"): ai_pb2.JOINT_LEFT_ANKLE, (R, "ankle"): ai_pb2.JOINT_RIGHT_ANKLE,
    (L, "ear"): ai_pb2.JOINT_LEFT_EAR, (R, "ear"): ai_pb2.JOINT_RIGHT_EAR,
}


@dataclass
class Recording:
    """Frames and the answers an analysis should find."""

    frames: list[ai_pb2.PoseFrame]
    #: (start frame, end frame) of each repetition.
    reps: list[tuple[int, int]]
    #: Named per-frame truths, e.g. "thigh_incline" or "hip_bend".
    truth: dict[str, list[float]] = field(default_factory=dict)

    def config(self, exercise: ai_pb2.ExerciseKind.ValueType,
               view: ai_pb2.CameraView.ValueType = ai_pb2.CAMERA_VIEW_UNSPECIFIED,
               *, aspect: bool = True) -> ai_pb2.FormAnalysisConfig:
        """A config for this recording; ``aspect`` False leaves the image size unknown."""
        return ai_pb2.FormAnalysisConfig(
            exercise=exercise, camera_view=view,
            image_width=WIDTH if aspect else 0, image_height=HEIGHT if aspect else 0,
        )


#: A recording generator: squat, push_up or deadlift.
Maker = Callable[..., "Recording"]


def progress(reps: int, period: int, lead: int = 15, tail: int = 15) -> tuple[list[float], list[tuple[int, int]]]:
    """0 at rest, 1 at the far end of each repetition (raised cosine), with rests before and after."""
    values = [0.0] * lead
    for _ in range(reps):
        values += [(1 - math.cos(2 * math.pi * k / period)) / 2 for k in range(period)]
    values += [0.0] * (tail + 1)
    spans = [(lead + i * period, lead + (i + 1) * period) for i in range(reps)]
    return values, spans


def _dir(angle_from_vertical: float, forward: bool = True) -> tuple[float, float]:
    """(up, forward) of a unit segment tilted from vertical, forward or backward."""
    a = math.radians(angle_from_vertical)
    return math.cos(a), math.sin(a) if forward else -math.sin(a)


def _add(p: World, lateral: float, up: float, forward: float) -> World:
    return (p[0] + lateral, p[1] + up, p[2] + forward)


@dataclass
class Camera:
    """Where the camera stands and how the estimator reports what it sees."""

    view: str = "side"  # "side": camera at the person's left, they face image right; "front": facing it
    noise: float = 0.0
    seed: int = 1
    far_confidence: float = 0.3
    depth: bool = False

    def shoot(self, bodies: list[dict[tuple[str, str], World]], fps: float = 30.0) -> list[ai_pb2.PoseFrame]:
        """Project each body onto the image and normalise it like an estimator."""
        rng = random.Random(self.seed)  # noqa: S311 - reproducible jitter, not secrets
        frames = []
        for i, body in enumerate(bodies):
            frame = ai_pb2.PoseFrame(time_offset=Duration(seconds=int(i / fps), nanos=round((i / fps % 1) * 1e9)))
            for (side, name), (lateral, up, forward) in body.items():
                if self.view == "side":
                    px, depth = WIDTH * 0.3 + forward * PIXELS_PER_METRE, -lateral
                    confidence = 0.95 if side == L else self.far_confidence
                else:
                    px, depth = WIDTH * 0.5 - lateral * PIXELS_PER_METRE, -forward
                    confidence = 0.95
                py = HEIGHT * 0.92 - up * PIXELS_PER_METRE
                x = px / WIDTH + rng.gauss(0, self.noise)
                y = py / HEIGHT + rng.gauss(0, self.noise)
                z = depth * PIXELS_PER_METRE / WIDTH if self.depth else 0.0
                frame.keypoints.append(
                    ai_pb2.Keypoint(joint=JOINTS[side, name], x=x, y=y, z=z, confidence=confidence)
                )
            frames.append(frame)
        return frames


def _legs(shank_tilt: float, thigh_tilt: float, trunk_lean: float, *, valgus: float = 0.0, neck_bend: float = 0.0,
          arms: str = "hang") -> dict[tuple[str, str], World]:
    """A standing-to-crouching body: ankles on the floor, knees forward, hips back, trunk leaning."""
    body: dict[tuple[str, str], World] = {}
    for side, sign in ((L, 1.0), (R, -1.0)):
        ankle: World = (sign * STANCE / 2, 0.08, 0.0)
        up, fwd = _dir(shank_tilt)
        knee_up = ankle[1] + SHANK * up
        up2, fwd2 = _dir(thigh_tilt, forward=False)
        hip_up = knee_up + THIGH * up2
        hip: World = (sign * HIP_WIDTH / 2, hip_up, ankle[2] + SHANK * fwd + THIGH * fwd2)
        # On the hip-ankle line at the knee's height, then pulled towards the midline by valgus.
        along = (knee_up - hip_up) / (ankle[1] - hip_up)
        knee_lateral = hip[0] + along * (ankle[0] - hip[0]) - sign * valgus * HIP_WIDTH
        knee: World = (knee_lateral, knee_up, ankle[2] + SHANK * fwd)
        up3, fwd3 = _dir(trunk_lean)
        shoulder = _add(hip, sign * (SHOULDER_WIDTH - HIP_WIDTH) / 2, TRUNK * up3, TRUNK * fwd3)
        up4, fwd4 = _dir(trunk_lean + neck_bend)
        ear = _add(shoulder, -sign * 0.1, NECK * up4, NECK * fwd4)
        if arms == "hang":
            elbow = _add(shoulder, 0.0, -UPPER_ARM, 0.0)
            wrist = _add(elbow, 0.0, -FOREARM, 0.0)
        else:  # held out in front for balance in a squat
            elbow = _add(shoulder, 0.0, 0.0, UPPER_ARM)
            wrist = _add(elbow, 0.0, 0.0, FOREARM)
        body.update({(side, "ankle"): ankle, (side, "knee"): knee, (side, "hip"): hip, (side, "shoulder"): shoulder,
                     (side, "ear"): ear, (side, "elbow"): elbow, (side, "wrist"): wrist})
    return body


def squat(reps: int = 5, period: int = 60, *, thigh_bottom: float = 100.0, shank_bottom: float = 35.0,
          trunk_bottom: float = 40.0, valgus: float = 0.0, lockout_loss: float = 0.0,
          camera: Camera | None = None) -> Recording:
    """Squats: thigh tilt from vertical at the bottom (90 is parallel), knees caving by ``valgus``
    hip widths at the bottom, and ``lockout_loss`` of the movement never undone between reps."""
    values, spans = progress(reps, period)
    bodies, incline, lean_excess, valgus_truth = [], [], [], []
    for p in values:
        q = lockout_loss + (1 - lockout_loss) * p
        thigh, shank, trunk = 2 + (thigh_bottom - 2) * q, 2 + (shank_bottom - 2) * q, 5 + (trunk_bottom - 5) * q
        bodies.append(_legs(shank, thigh, trunk, valgus=valgus * q, arms="front"))
        incline.append(90 - thigh)
        lean_excess.append(trunk - shank)
        valgus_truth.append(valgus * q)
    frames = (camera or Camera()).shoot(bodies)
    return Recording(frames, spans, {"thigh_incline": incline, "lean_excess": lean_excess, "valgus": valgus_truth})


def deadlift(reps: int = 4, period: int = 75, *, thigh_bottom: float = 60.0, shank_bottom: float = 20.0,
             trunk_bottom: float = 55.0, rounding: float = 0.0, hips_first: float = 0.0, lockout_loss: float = 0.0,
             camera: Camera | None = None) -> Recording:
    """Deadlifts from the floor (rest) to lockout and back. ``rounding`` drops the head and upper
    back below the trunk line at the floor; ``hips_first`` makes the legs straighten at double
    speed while the trunk tips over by up to that many degrees early in the pull."""
    values, spans = progress(reps, period)
    bodies, hip_angle = [], []
    for p in values:
        top = 1 - lockout_loss
        q = 1 - p * top  # 1 on the floor, lockout_loss at the top
        rising = hips_first > 0
        legs = max(0.0, 1 - 2 * (1 - q)) if rising else q
        bump = hips_first * math.sin(math.pi * min(1.0, (1 - q) / 0.5)) if rising and 1 - q < 0.5 else 0.0
        thigh, shank = thigh_bottom * legs, shank_bottom * legs
        trunk = trunk_bottom * q + bump
        bodies.append(_legs(shank, thigh, trunk, neck_bend=rounding * q))
        hip_angle.append(180 - thigh - trunk)
    frames = (camera or Camera()).shoot(bodies)
    return Recording(frames, spans, {"hip_angle": hip_angle})


def push_up(reps: int = 5, period: int = 50, *, elbow_bottom: float = 80.0, elbow_top: float = 172.0,
            hip_offset: float = 0.0, camera: Camera | None = None) -> Recording:
    """Push-ups on the toes, seen side on. ``hip_offset`` (metres) moves the hips off the
    shoulder-ankle line: positive sags towards the floor, negative pikes."""
    values, spans = progress(reps, period)
    ankle_up, body_length, hip_at = 0.06, 1.40, 0.9 / 1.40
    reach_top = _arm_reach(elbow_top)
    wrist_forward = math.sqrt(body_length**2 - (reach_top - ankle_up) ** 2)
    bodies, bends = [], []
    for p in values:
        elbow_angle = elbow_top + (elbow_bottom - elbow_top) * p
        reach = _arm_reach(elbow_angle)
        shoulder_f, shoulder_u = _circles((0.0, ankle_up), body_length, (wrist_forward, 0.0), reach, upper=True)
        elbow_f, elbow_u = _circles((shoulder_f, shoulder_u), UPPER_ARM, (wrist_forward, 0.0), FOREARM, upper=True,
                                    prefer=lambda f, u: -f)
        line_f, line_u = shoulder_f, shoulder_u - ankle_up
        # Perpendicular to the body line, pointing at the floor.
        nf, nu = line_u / body_length, -line_f / body_length
        hip_f = line_f * hip_at + nf * hip_offset
        hip_u = ankle_up + line_u * hip_at + nu * hip_offset
        knee_f, knee_u = hip_f / 2, (ankle_up + hip_u) / 2
        body: dict[tuple[str, str], World] = {}
        for side, sign in ((L, 1.0), (R, -1.0)):
            body.update({
                (side, "ankle"): (sign * 0.1, ankle_up, 0.0), (side, "knee"): (sign * 0.1, knee_u, knee_f),
                (side, "hip"): (sign * HIP_WIDTH / 2, hip_u, hip_f),
                (side, "shoulder"): (sign * SHOULDER_WIDTH / 2, shoulder_u, shoulder_f),
                (side, "elbow"): (sign * 0.25, elbow_u, elbow_f), (side, "wrist"): (sign * 0.25, 0.0, wrist_forward),
                (side, "ear"): (sign * 0.08, shoulder_u + line_u / body_length * 0.2,
                                shoulder_f + line_f / body_length * 0.2),
            })
        bodies.append(body)
        bends.append(_bend((0.0, ankle_up), (hip_f, hip_u), (shoulder_f, shoulder_u)))
    frames = (camera or Camera()).shoot(bodies)
    return Recording(frames, spans, {"hip_bend": bends})


def _arm_reach(elbow_angle: float) -> float:
    """Shoulder-to-wrist distance for an elbow angle (law of cosines)."""
    c = math.cos(math.radians(elbow_angle))
    return math.sqrt(UPPER_ARM**2 + FOREARM**2 - 2 * UPPER_ARM * FOREARM * c)


def _circles(a: tuple[float, float], ra: float, b: tuple[float, float], rb: float, *, upper: bool,
             prefer: Callable[[float, float], float] | None = None) -> tuple[float, float]:
    """An intersection of two circles in the (forward, up) plane: the higher one, or the one ``prefer`` ranks first."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    d = math.hypot(dx, dy)
    along = (ra**2 - rb**2 + d**2) / (2 * d)
    h = math.sqrt(max(0.0, ra**2 - along**2))
    mx, my = a[0] + along * dx / d, a[1] + along * dy / d
    options = [(mx + h * dy / d, my - h * dx / d), (mx - h * dy / d, my + h * dx / d)]
    if prefer is not None:
        return max(options, key=lambda o: prefer(*o))
    return max(options, key=lambda o: o[1]) if upper else min(options, key=lambda o: o[1])


def _bend(ankle: tuple[float, float], hip: tuple[float, float], shoulder: tuple[float, float]) -> float:
    """Signed deviation from a straight shoulder-hip-ankle line: positive when the hips sag."""
    v1 = (ankle[0] - hip[0], ankle[1] - hip[1])
    v2 = (shoulder[0] - hip[0], shoulder[1] - hip[1])
    cos = (v1[0] * v2[0] + v1[1] * v2[1]) / (math.hypot(*v1) * math.hypot(*v2))
    angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
    # The hip is below the line when it is lower than the line's height at the hip's position.
    t = (hip[0] - ankle[0]) / (shoulder[0] - ankle[0])
    line_up = ankle[1] + t * (shoulder[1] - ankle[1])
    return (180 - angle) if hip[1] < line_up else -(180 - angle)
