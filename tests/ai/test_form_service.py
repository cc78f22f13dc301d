"""AnalyzeForm and StreamFormAnalysis through the real server: answers, replies per rep, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
import pytest
from fittracker.ai.v1 import ai_pb2, ai_service_pb2

from tests.ai import kinematics as k
from tests.ai.conftest import Stack
from tests.support import field_violations

SQUAT = ai_pb2.EXERCISE_KIND_SQUAT


async def stream(stack: Stack, token: str, requests: Iterable[ai_service_pb2.StreamFormAnalysisRequest]
                 ) -> list[ai_service_pb2.StreamFormAnalysisResponse]:
    async def source() -> AsyncIterator[ai_service_pb2.StreamFormAnalysisRequest]:
        for request in requests:
            yield request

    call = stack.ai.StreamFormAnalysis(source(), metadata=(("authorization", f"Bearer {token}"),))
    return [reply async for reply in call]


async def test_analyze_form_counts_and_judges_a_recording(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=5, thigh_bottom=70)
    analysis = await stack.ai.AnalyzeForm(
        ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames),
        metadata=caller.metadata,
    )
    assert analysis.exercise == SQUAT
    assert analysis.rep_count == 5
    assert analysis.frame_count == len(recording.frames)
    assert [f.kind for f in analysis.faults] == [ai_pb2.FAULT_KIND_SHALLOW_DEPTH] * 5
    assert 0 < analysis.score < 100


async def test_a_full_minute_of_frames_is_analysed_in_one_call(stack: Stack) -> None:
    # How fast is `make loadtest`'s to say; here, a minute at 30 fps fits one call and its deadline.
    caller = await stack.register()
    recording = k.squat(reps=29, period=60)
    frames = recording.frames[:1800]
    analysis = await stack.ai.AnalyzeForm(
        ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=frames), metadata=caller.metadata,
        timeout=10,
    )
    assert analysis.rep_count == 29


async def test_stream_replies_after_every_rep_and_ends_with_the_full_analysis(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=4, thigh_bottom=75)
    requests = [ai_service_pb2.StreamFormAnalysisRequest(config=recording.config(SQUAT))]
    requests += [ai_service_pb2.StreamFormAnalysisRequest(frame=f) for f in recording.frames]
    replies = await stream(stack, caller.token, requests)
    progress, final = replies[:-1], replies[-1]
    assert [r.analysis.rep_count for r in progress] == [1, 2, 3, 4]
    assert not any(r.final for r in progress) and final.final
    # Each reply comes while the stream is still going, right after its rep ended.
    for reply, (_, end) in zip(progress, recording.reps, strict=True):
        assert reply.analysis.frame_count - end < 20
    unary = await stack.ai.AnalyzeForm(
        ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames),
        metadata=caller.metadata,
    )
    assert final.analysis == unary


@pytest.mark.parametrize(("frames", "field"), [
    (1, "frames"), (1801, "frames"),
])
async def test_frame_count_is_checked(stack: Stack, frames: int, field: str) -> None:
    caller = await stack.register()
    recording = k.squat(reps=31)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(
            ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames[:frames]),
            metadata=caller.metadata,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error.value) == [field]


async def test_bad_keypoints_and_times_name_the_field(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=1)
    recording.frames[12].keypoints[3].x = 3.0
    recording.frames[12].keypoints[5].confidence = -0.5
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(
            ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames),
            metadata=caller.metadata,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(error.value) == ["frames[12].keypoints[3].x", "frames[12].keypoints[5].confidence"]
    assert "frames[12].keypoints[3].x" in (error.value.details() or "")

    recording = k.squat(reps=1)
    recording.frames[20].time_offset.CopyFrom(recording.frames[19].time_offset)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(
            ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames),
            metadata=caller.metadata,
        )
    assert field_violations(error.value) == ["frames[20].time_offset"]


async def test_config_rules_come_from_the_contract(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=1)
    config = recording.config(SQUAT)
    config.exercise = ai_pb2.EXERCISE_KIND_UNSPECIFIED
    config.image_width = 20000
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(ai_service_pb2.AnalyzeFormRequest(config=config, frames=recording.frames),
                                   metadata=caller.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field_violations(error.value)) == ["config.exercise", "config.image_width"]


async def test_missing_landmarks_fail_the_precondition(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=2)
    for frame in recording.frames:
        kept = [kp for kp in frame.keypoints if kp.joint not in (ai_pb2.JOINT_LEFT_KNEE, ai_pb2.JOINT_RIGHT_KNEE)]
        del frame.keypoints[:]
        frame.keypoints.extend(kept)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(
            ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT), frames=recording.frames),
            metadata=caller.metadata,
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "0 of" in (error.value.details() or "")


async def test_stream_protocol_errors(stack: Stack) -> None:
    caller = await stack.register()
    recording = k.squat(reps=1)
    config = ai_service_pb2.StreamFormAnalysisRequest(config=recording.config(SQUAT))
    frame = ai_service_pb2.StreamFormAnalysisRequest(frame=recording.frames[0])
    cases = [
        ([frame], "config"),
        ([config, config], "frame"),
        ([], "config"),
    ]
    for requests, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stream(stack, caller.token, requests)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_violations(error.value) == [field]
    bad = ai_service_pb2.StreamFormAnalysisRequest()
    bad.frame.CopyFrom(recording.frames[1])
    bad.frame.keypoints[0].y = -2
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream(stack, caller.token, [config, frame, bad])
    assert field_violations(error.value) == ["frame.keypoints[0].y"]
    assert "(frame 1)" in (error.value.details() or "")


async def test_form_analysis_needs_a_token(stack: Stack) -> None:
    recording = k.squat(reps=1)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stack.ai.AnalyzeForm(ai_service_pb2.AnalyzeFormRequest(config=recording.config(SQUAT),
                                                                     frames=recording.frames))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
