"""Form analysis on synthetic recordings whose answers are known by construction (kinematics.py).

These tests drive ``FormAnalyzer`` directly, frame by frame as both RPCs do; the service tests
send the same recordings through the real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fittracker.ai.v1 import ai_pb2, ai_service_pb2
from google.protobuf.duration_pb2 import Duration

from services.ai.form import FormAnalyzer
from services.ai.service import AiService, OutOfRange
from services.runtime.errors import FailedPrecondition, InvalidArgument
from tests.ai import kinematics as k
from tests.ai.kinematics import Camera, Recording

SQUAT, PUSH_UP, DEADLIFT = ai_pb2.EXERCISE_KIND_SQUAT, ai_pb2.EXERCISE_KIND_PUSH_UP, ai_pb2.EXERCISE_KIND_DEADLIFT
#: Rep boundaries may differ from the model's by this many frames (a tenth of a second at 30 fps):
#: the analysis places them where the key angle leaves and regains its resting band.
EDGE_TOLERANCE = 3
#: Facing the camera without depth, the first ~14 degrees of bending barely shorten a limb's image
#: (cos 14 = 0.97), so a rep is seen to start and end a few frames later and earlier.
FRONT_EDGE_TOLERANCE = 6


def analyse(recording: Recording, exercise: ai_pb2.ExerciseKind.ValueType,
            view: ai_pb2.CameraView.ValueType = ai_pb2.CAMERA_VIEW_UNSPECIFIED, *,
            aspect: bool = True) -> ai_pb2.FormAnalysis:
    analyzer = FormAnalyzer(recording.config(exercise, view, aspect=aspect))
    for i, frame in enumerate(recording.frames):
        analyzer.add(frame, f"frames[{i}]")
    return analyzer.finish()


def faults_of(analysis: ai_pb2.FormAnalysis, kind: ai_pb2.FaultKind.ValueType) -> list[ai_pb2.FormFault]:
    return [f for f in analysis.faults if f.kind == kind]


def assert_reps_match(analysis: ai_pb2.FormAnalysis, recording: Recording, tolerance: int = EDGE_TOLERANCE) -> None:
    assert analysis.rep_count == len(recording.reps)
    assert [r.index for r in analysis.reps] == list(range(1, len(recording.reps) + 1))
    for rep, (start, end) in zip(analysis.reps, recording.reps, strict=True):
        assert abs(rep.start_frame - start) <= tolerance, (rep, start)
        assert abs(rep.end_frame - end) <= tolerance, (rep, end)


# --- counting ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("exercise", "make", "reps", "period"), [
    (SQUAT, k.squat, 1, 60), (SQUAT, k.squat, 6, 45), (SQUAT, k.squat, 10, 90),
    (PUSH_UP, k.push_up, 3, 50), (PUSH_UP, k.push_up, 8, 36),
    (DEADLIFT, k.deadlift, 2, 75), (DEADLIFT, k.deadlift, 5, 60),
])
def test_counts_every_rep_with_its_frame_range(exercise: ai_pb2.ExerciseKind.ValueType, make: k.Maker, reps: int,
                                               period: int) -> None:
    recording = make(reps=reps, period=period)
    analysis = analyse(recording, exercise)
    assert_reps_match(analysis, recording)
    assert analysis.frame_count == len(recording.frames)
    assert analysis.skipped_frame_count == 0
    assert analysis.camera_view == ai_pb2.CAMERA_VIEW_SIDE
    assert analysis.faults == []
    assert analysis.score == 100
    for rep in analysis.reps:
        assert rep.duration.ToNanoseconds() == pytest.approx((rep.end_frame - rep.start_frame) / 30 * 1e9, abs=1e6)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_jittery_landmarks_still_count_exactly(seed: int) -> None:
    # About 3 pixels of jitter per landmark and frame, the scale of a good pose estimator.
    recording = k.squat(reps=6, camera=Camera(noise=0.004, seed=seed))
    analysis = analyse(recording, SQUAT)
    assert_reps_match(analysis, recording, tolerance=10)
    assert faults_of(analysis, ai_pb2.FAULT_KIND_SHALLOW_DEPTH) == []


def test_front_view_counts_from_foreshortening() -> None:
    # Facing the camera without depth, knee flexion is reconstructed from how short the thighs
    # and shins look, and counting works as it does side on.
    recording = k.squat(reps=5, camera=Camera(view="front"))
    analysis = analyse(recording, SQUAT)
    assert analysis.camera_view == ai_pb2.CAMERA_VIEW_FRONT
    assert_reps_match(analysis, recording, tolerance=FRONT_EDGE_TOLERANCE)
    knee = next(a for a in analysis.joint_angles if a.angle == ai_pb2.JOINT_ANGLE_LEFT_KNEE)
    assert knee.min_deg == pytest.approx(180 - 100 - 35, abs=6)


def test_front_view_uses_estimator_depth_when_given() -> None:
    recording = k.squat(reps=4, camera=Camera(view="front", depth=True))
    analysis = analyse(recording, SQUAT)
    assert_reps_match(analysis, recording)
    knee = next(a for a in analysis.joint_angles if a.angle == ai_pb2.JOINT_ANGLE_LEFT_KNEE)
    assert knee.min_deg == pytest.approx(45, abs=1.5)


def test_aspect_ratio_correction_gives_true_angles() -> None:
    recording = k.squat(reps=3)
    corrected = analyse(recording, SQUAT)
    # The model's deepest knee angle is 180 - thigh tilt - shin tilt = 45 degrees.
    assert corrected.reps[0].min_angle_deg == pytest.approx(45, abs=1.5)
    assert corrected.reps[0].max_angle_deg == pytest.approx(180 - 2 - 2, abs=3)
    distorted = analyse(recording, SQUAT, aspect=False)
    assert abs(distorted.reps[0].min_angle_deg - 45) > 4


def test_the_nearer_side_is_used_whether_or_not_the_far_side_is_seen() -> None:
    hidden = analyse(k.squat(reps=3), SQUAT)
    seen = analyse(k.squat(reps=3, camera=Camera(far_confidence=0.9)), SQUAT)
    assert [(r.start_frame, r.end_frame) for r in hidden.reps] == [(r.start_frame, r.end_frame) for r in seen.reps]
    assert hidden.reps[0].key_angle == ai_pb2.JOINT_ANGLE_LEFT_KNEE


def test_configured_view_overrides_inference() -> None:
    analysis = analyse(k.squat(reps=2), SQUAT, ai_pb2.CAMERA_VIEW_SIDE)
    assert analysis.camera_view == ai_pb2.CAMERA_VIEW_SIDE
    front = analyse(k.squat(reps=2, camera=Camera(view="front")), SQUAT)
    assert front.camera_view == ai_pb2.CAMERA_VIEW_FRONT


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("thigh_bottom", [110.0, 95.0, 88.0, 82.0, 70.0, 50.0])
def test_shallow_depth_is_found_iff_the_hips_stay_above_parallel(thigh_bottom: float) -> None:
    recording = k.squat(reps=4, thigh_bottom=thigh_bottom)
    analysis = analyse(recording, SQUAT)
    assert_reps_match(analysis, recording)
    above_parallel = 90 - thigh_bottom  # degrees the thighs stay above horizontal at the bottom
    shallow = faults_of(analysis, ai_pb2.FAULT_KIND_SHALLOW_DEPTH)
    if above_parallel <= 5:  # the allowance for where estimators put the hip landmark
        assert shallow == []
        assert analysis.score == 100
        return
    assert [f.rep_index for f in shallow] == [1, 2, 3, 4]
    expected = ai_pb2.FAULT_SEVERITY_MAJOR if above_parallel >= 30 else (
        ai_pb2.FAULT_SEVERITY_MODERATE if above_parallel >= 15 else ai_pb2.FAULT_SEVERITY_MINOR)
    for fault, (start, end) in zip(shallow, recording.reps, strict=True):
        bottom = (start + end) // 2
        assert fault.start_frame <= bottom <= fault.end_frame
        assert fault.end_frame - fault.start_frame < (end - start) / 2
        assert fault.severity == expected
        assert f"{above_parallel:.0f} degrees above parallel" in fault.message
    assert analysis.score < 100


@pytest.mark.parametrize(("valgus", "expected"), [(0.0, False), (0.1, False), (0.35, True), (0.6, True)])
def test_knee_valgus_is_found_iff_injected(valgus: float, expected: bool) -> None:
    recording = k.squat(reps=4, valgus=valgus, camera=Camera(view="front"))
    analysis = analyse(recording, SQUAT)
    assert_reps_match(analysis, recording, tolerance=FRONT_EDGE_TOLERANCE)
    found = faults_of(analysis, ai_pb2.FAULT_KIND_KNEE_VALGUS)
    if not expected:
        assert found == []
        return
    assert [f.rep_index for f in found] == [1, 2, 3, 4]
    truth = recording.truth["valgus"]
    for fault, (start, end) in zip(found, recording.reps, strict=True):
        assert fault.start_frame <= (start + end) // 2 <= fault.end_frame
        # Every frame the model caves in by more than the threshold lies inside the reported span.
        caved = [i for i in range(start, end + 1) if truth[i] > 0.17]
        assert fault.start_frame <= caved[0] + 2 and fault.end_frame >= caved[-1] - 2
    assert found[0].severity == (ai_pb2.FAULT_SEVERITY_MAJOR if valgus >= 0.5 else ai_pb2.FAULT_SEVERITY_MODERATE)


def test_valgus_needs_a_front_view_and_depth_a_side_view() -> None:
    side = analyse(k.squat(reps=2, valgus=0.4, thigh_bottom=70), SQUAT)
    assert faults_of(side, ai_pb2.FAULT_KIND_KNEE_VALGUS) == []
    assert faults_of(side, ai_pb2.FAULT_KIND_SHALLOW_DEPTH) != []
    front = analyse(k.squat(reps=2, valgus=0.4, thigh_bottom=70, camera=Camera(view="front")), SQUAT)
    assert faults_of(front, ai_pb2.FAULT_KIND_KNEE_VALGUS) != []
    assert faults_of(front, ai_pb2.FAULT_KIND_SHALLOW_DEPTH) == []


@pytest.mark.parametrize(("trunk_bottom", "expected"), [(40.0, False), (55.0, False), (75.0, True)])
def test_forward_lean_is_judged_against_the_shins(trunk_bottom: float, expected: bool) -> None:
    recording = k.squat(reps=3, trunk_bottom=trunk_bottom)
    analysis = analyse(recording, SQUAT)
    leaning = faults_of(analysis, ai_pb2.FAULT_KIND_EXCESSIVE_FORWARD_LEAN)
    assert bool(leaning) == expected
    if expected:
        excess = max(recording.truth["lean_excess"])  # trunk minus shin angle at the bottom
        assert f"{excess:.0f} degrees further forward" in leaning[0].message


def test_incomplete_lockout_of_squats() -> None:
    recording = k.squat(reps=3, lockout_loss=0.3)
    analysis = analyse(recording, SQUAT)
    assert_reps_match(analysis, recording)
    lockouts = faults_of(analysis, ai_pb2.FAULT_KIND_INCOMPLETE_LOCKOUT)
    assert [f.rep_index for f in lockouts] == [1, 2, 3]
    for fault, (_, end) in zip(lockouts, recording.reps, strict=True):
        assert abs(fault.end_frame - end) <= EDGE_TOLERANCE


@pytest.mark.parametrize(("hip_offset", "sag", "pike"), [
    (0.0, False, False), (0.02, False, False), (0.08, True, False), (0.15, True, False),
    (-0.03, False, False), (-0.12, False, True),
])
def test_push_up_hip_line(hip_offset: float, sag: bool, pike: bool) -> None:
    recording = k.push_up(reps=3, hip_offset=hip_offset)
    analysis = analyse(recording, PUSH_UP)
    assert_reps_match(analysis, recording)
    bend = recording.truth["hip_bend"][0]  # the model's deviation from a straight line, + = sagging
    assert (bend > 10) == sag and (-bend > 15) == pike
    sagging = faults_of(analysis, ai_pb2.FAULT_KIND_HIPS_SAGGING)
    piking = faults_of(analysis, ai_pb2.FAULT_KIND_HIPS_PIKING)
    assert bool(sagging) == sag
    assert bool(piking) == pike
    for fault in sagging + piking:
        rep = analysis.reps[fault.rep_index - 1]
        assert fault.start_frame == rep.start_frame and fault.end_frame == rep.end_frame  # the whole rep
        assert f"{abs(bend):.0f} degrees" in fault.message
    line = next(a for a in analysis.joint_angles if a.angle == ai_pb2.JOINT_ANGLE_BODY_LINE)
    assert line.mean_deg == pytest.approx(180 - abs(bend), abs=1)


@pytest.mark.parametrize(("elbow_bottom", "elbow_top", "shallow", "lockout"), [
    (80.0, 172.0, False, False), (92.0, 172.0, False, False), (110.0, 172.0, True, False),
    (80.0, 150.0, False, True),
])
def test_push_up_range_of_motion(elbow_bottom: float, elbow_top: float, shallow: bool, lockout: bool) -> None:
    recording = k.push_up(reps=4, elbow_bottom=elbow_bottom, elbow_top=elbow_top)
    analysis = analyse(recording, PUSH_UP)
    assert_reps_match(analysis, recording)
    assert bool(faults_of(analysis, ai_pb2.FAULT_KIND_SHALLOW_DEPTH)) == shallow
    assert bool(faults_of(analysis, ai_pb2.FAULT_KIND_INCOMPLETE_LOCKOUT)) == lockout
    assert analysis.reps[1].min_angle_deg == pytest.approx(elbow_bottom, abs=2)


@pytest.mark.parametrize(("rounding", "expected"), [(0.0, False), (10.0, False), (35.0, True)])
def test_deadlift_rounded_back(rounding: float, expected: bool) -> None:
    recording = k.deadlift(reps=3, rounding=rounding)
    analysis = analyse(recording, DEADLIFT)
    assert_reps_match(analysis, recording)
    rounded = faults_of(analysis, ai_pb2.FAULT_KIND_ROUNDED_BACK)
    assert bool(rounded) == expected
    if expected:
        assert [f.rep_index for f in rounded] == [1, 2, 3]
        for fault, (start, _) in zip(rounded, recording.reps, strict=True):
            assert abs(fault.start_frame - start) <= 4  # worst on the floor, where the pull starts


@pytest.mark.parametrize(("hips_first", "expected"), [(0.0, False), (30.0, True)])
def test_deadlift_hips_rising_first(hips_first: float, expected: bool) -> None:
    recording = k.deadlift(reps=3, hips_first=hips_first)
    analysis = analyse(recording, DEADLIFT)
    assert analysis.rep_count == 3
    early = faults_of(analysis, ai_pb2.FAULT_KIND_HIPS_RISE_FIRST)
    assert bool(early) == expected
    for rep, (start, _) in zip(analysis.reps, recording.reps, strict=True):
        # When the knees straighten before the hips open, the rep is dated from the knees.
        assert abs(rep.start_frame - start) <= 4
    for fault in early:
        start, end = recording.reps[fault.rep_index - 1]
        assert start <= fault.start_frame <= fault.end_frame <= start + (end - start) // 2


def test_deadlift_lockout() -> None:
    analysis = analyse(k.deadlift(reps=2, lockout_loss=0.2), DEADLIFT)
    lockouts = faults_of(analysis, ai_pb2.FAULT_KIND_INCOMPLETE_LOCKOUT)
    assert [f.rep_index for f in lockouts] == [1, 2]
    assert "hips" in lockouts[0].message


def test_score_falls_with_severity_and_number_of_faults() -> None:
    clean = analyse(k.squat(reps=3), SQUAT).score
    minor = analyse(k.squat(reps=3, thigh_bottom=80), SQUAT).score
    major = analyse(k.squat(reps=3, thigh_bottom=50), SQUAT).score
    two = analyse(k.squat(reps=3, thigh_bottom=50, trunk_bottom=80), SQUAT).score
    assert clean == 100
    assert 100 > minor > major > two > 0


# --- missing landmarks and bad input -----------------------------------------------------------


def _without(recording: Recording, joints: set[int], frames: range) -> Recording:
    for i in frames:
        kept = [kp for kp in recording.frames[i].keypoints if kp.joint not in joints]
        del recording.frames[i].keypoints[:]
        recording.frames[i].keypoints.extend(kept)
    return recording


def test_frames_without_the_key_landmarks_are_skipped_and_counted() -> None:
    recording = _without(k.squat(reps=3), {ai_pb2.JOINT_LEFT_KNEE, ai_pb2.JOINT_RIGHT_KNEE}, range(100, 110))
    analysis = analyse(recording, SQUAT)
    assert analysis.skipped_frame_count == 10
    assert analysis.rep_count == 3


def test_too_few_usable_frames_fail_the_precondition() -> None:
    recording = k.squat(reps=2)
    _without(recording, {ai_pb2.JOINT_LEFT_ANKLE, ai_pb2.JOINT_RIGHT_ANKLE}, range(len(recording.frames) // 2 + 5))
    with pytest.raises(FailedPrecondition, match="hip, knee and ankle"):
        analyse(recording, SQUAT)


def test_low_confidence_landmarks_count_as_unseen() -> None:
    recording = k.squat(reps=2)
    for frame in recording.frames:
        for kp in frame.keypoints:
            kp.confidence = 0.49
    with pytest.raises(FailedPrecondition):
        analyse(recording, SQUAT)


@pytest.mark.parametrize(("change", "field"), [
    (lambda f: setattr(f.keypoints[2], "x", 2.5), "frames[7].keypoints[2].x"),
    (lambda f: setattr(f.keypoints[0], "y", float("nan")), "frames[7].keypoints[0].y"),
    (lambda f: setattr(f.keypoints[1], "z", -11.0), "frames[7].keypoints[1].z"),
    (lambda f: setattr(f.keypoints[3], "confidence", 1.5), "frames[7].keypoints[3].confidence"),
    (lambda f: setattr(f.keypoints[4], "joint", ai_pb2.JOINT_UNSPECIFIED), "frames[7].keypoints[4].joint"),
    (lambda f: setattr(f.keypoints[5], "joint", f.keypoints[0].joint), "frames[7].keypoints[5].joint"),
    (lambda f: f.ClearField("time_offset"), "frames[7].time_offset"),
    (lambda f: f.time_offset.CopyFrom(Duration(seconds=0)), "frames[7].time_offset"),
    (lambda f: f.time_offset.CopyFrom(Duration(seconds=3601)), "frames[7].time_offset"),
    (lambda f: f.keypoints.extend([ai_pb2.Keypoint(joint=ai_pb2.JOINT_NOSE)] * 20), "frames[7].keypoints"),
])
def test_bad_frames_name_the_field(change: object, field: str) -> None:
    recording = k.squat(reps=1)
    change(recording.frames[7])  # type: ignore[operator]
    with pytest.raises(InvalidArgument) as error:
        analyse(recording, SQUAT)
    assert error.value.violations[0][0] == field


async def test_a_stream_past_its_limit_is_out_of_range() -> None:
    # The limit is an hour of frames; the handler takes a smaller one so the test stays quick.
    recording = k.squat(reps=1)
    service = AiService(None, None, None, max_stream_frames=20)  # type: ignore[arg-type]  # form analysis needs neither

    async def requests() -> AsyncIterator[ai_service_pb2.StreamFormAnalysisRequest]:
        yield ai_service_pb2.StreamFormAnalysisRequest(config=recording.config(SQUAT))
        for frame in recording.frames:
            yield ai_service_pb2.StreamFormAnalysisRequest(frame=frame)

    replies = []
    with pytest.raises(OutOfRange, match="at most 20 frames"):
        async for reply in service.StreamFormAnalysis(requests(), None):  # type: ignore[arg-type]
            replies.append(reply)
    assert all(not r.final for r in replies)
