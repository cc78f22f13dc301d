"""Events on the bus become notifications once each; UserDeleted erases the user's data and is
answered with DataErased."""

from __future__ import annotations

import asyncio
import base64
import uuid

import grpc
import pytest
from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2
from fittracker.notification.v1 import notification_pb2, notification_service_pb2
from fittracker.user.v1 import user_pb2, user_service_pb2
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp

from services.runtime.events import OUTBOX, fact_id, make_envelope
from tests.notification.conftest import Account, NotificationEnv
from tests.notification.test_subscribe import READ_TIMEOUT, StreamCall, notifications, read, subscribe

Chan = notification_pb2


async def live_stream(env: NotificationEnv, account: Account, replica: int = 0) -> StreamCall:
    call = subscribe(env, account, replica=replica)
    assert (await read(call)).HasField("heartbeat")
    return call


async def test_a_personal_record_becomes_one_notification_in_the_users_units(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.users.UpdatePreferences(
        user_service_pb2.UpdatePreferencesRequest(
            preferences=user_pb2.Preferences(name=f"{ada.name}/preferences", unit_system=user_pb2.UNIT_SYSTEM_IMPERIAL),
            update_mask=FieldMask(paths=["unit_system"])),
        metadata=ada.auth)
    call = await live_stream(env, ada)
    try:
        record = events_pb2.PersonalRecordAchieved(
            personal_record=f"{ada.name}/personalRecords/pr1", exercise="exercises/barbell-back-squat",
            kind=fitness_pb2.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT, value=120.0, previous_value=115.0,
            weight_kg=120.0, reps=1, session=f"{ada.name}/sessions/s1")
        envelope = make_envelope("workout", ada.user_id, record)
        await env.publish(envelope)
        (got,) = await notifications(call, 1)
        assert got.title == "New personal record!"
        assert got.body == "Barbell back squat: 264.6 lb, your heaviest yet, 11 lb more than before."
        assert got.category == Chan.CATEGORY_PERSONAL_RECORD
        assert got.data["session"] == f"{ada.name}/sessions/s1"
        # Redelivery of the same event, then another fact: only the other one is new.
        await env.publish(envelope)
        streak = make_envelope("analytics", ada.user_id, events_pb2.StreakMilestoneReached(
            streak_days=7, session=f"{ada.name}/sessions/s1"))
        await env.publish(streak)
        (following,) = await notifications(call, 1)
        assert (following.title, following.cursor) == ("7-day streak!", got.cursor + 1)
    finally:
        call.cancel()


async def test_a_completed_session_is_summarised(env: NotificationEnv) -> None:
    ada = await env.account()
    call = await live_stream(env, ada)
    try:
        start, end = Timestamp(seconds=1_700_000_000), Timestamp(seconds=1_700_000_000 + 47 * 60)
        await env.publish(make_envelope("workout", ada.user_id, events_pb2.SessionCompleted(
            session=f"{ada.name}/sessions/s2", start_time=start, end_time=end, total_volume_kg=5400.0,
            total_sets=18, personal_record_count=2)))
        (got,) = await notifications(call, 1)
        assert got.title == "Workout complete"
        assert got.body == "Nice work: 47 min, 18 sets, 5,400 kg lifted. You set 2 personal records!"
        assert got.category == Chan.CATEGORY_WORKOUT_COMPLETED
    finally:
        call.cancel()


async def test_user_deleted_erases_data_and_answers_data_erased(env: NotificationEnv) -> None:
    ada = await env.account()
    await env.send(ada, Chan.CHANNEL_IN_APP)
    await env.register_device(ada, Chan.PLATFORM_ANDROID)
    # One stream per replica: whichever replica handles the event ends its stream once done.
    streams = [await live_stream(env, ada, replica) for replica in range(len(env.stubs))]
    deletion = uuid.uuid4().hex
    try:
        await env.publish(make_envelope("user", ada.user_id, events_pb2.UserDeleted(
            deletion_request_id=deletion, expected_services=["notification"])))
        reads = [asyncio.ensure_future(s.read()) for s in streams]
        done, _ = await asyncio.wait(reads, timeout=READ_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no stream ended"
        error = next(iter(done)).exception()
        assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.NOT_FOUND
    finally:
        for stream in streams:
            stream.cancel()
    # The answer waits in the outbox (the runtime's relay publishes it); its id is deterministic.
    entry = await env.replicas[0].resources.store.collection(OUTBOX).get(
        fact_id("notification.data_erased", deletion))
    assert entry is not None
    answer = events_pb2.EventEnvelope.FromString(base64.b64decode(entry["envelope"]))
    assert (answer.producer, answer.user) == ("notification", ada.name)
    assert (answer.data_erased.service, answer.data_erased.deletion_request_id) == ("notification", deletion)
    listed = await env.stub.ListNotifications(
        notification_service_pb2.ListNotificationsRequest(parent=ada.name), metadata=ada.auth)
    devices = await env.stub.ListDevices(notification_service_pb2.ListDevicesRequest(parent=ada.name),
                                         metadata=ada.auth)
    assert (len(listed.notifications), len(devices.devices)) == (0, 0)


async def test_events_for_unknown_users_are_dropped(env: NotificationEnv) -> None:
    ada = await env.account()
    call = await live_stream(env, ada)
    try:
        await env.publish(make_envelope("workout", "ghost-user", events_pb2.SessionCompleted(total_sets=1)))
        await env.publish(make_envelope("workout", ada.user_id, events_pb2.SessionCompleted(total_sets=1)))
        (got,) = await notifications(call, 1)
        assert got.body == "Nice work: 1 set."
    finally:
        call.cancel()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await env.stub.ListNotifications(
            notification_service_pb2.ListNotificationsRequest(parent="users/ghost-user"), metadata=env.admin.auth)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
