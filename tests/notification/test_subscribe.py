"""Subscribe: heartbeat first, live notifications, resume without loss or duplicates, fan-out
between replicas, ownership, heartbeats on idle streams, and the end of a stream on drain."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from fittracker.notification.v1 import notification_pb2, notification_service_pb2, notification_service_pb2_grpc

from services import notification
from services.runtime.server import start_service
from tests.notification.conftest import Account, NotificationEnv

Chan = notification_pb2
#: Every read of a stream is bounded: a missing message fails the test instead of hanging it.
READ_TIMEOUT = 10.0

StreamCall = grpc.aio.UnaryStreamCall[notification_service_pb2.SubscribeRequest,
                                      notification_service_pb2.SubscribeResponse]


async def read(call: StreamCall) -> notification_service_pb2.SubscribeResponse:
    message = await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert message is not grpc.aio.EOF, "the stream ended"
    assert isinstance(message, notification_service_pb2.SubscribeResponse)
    return message


async def notifications(call: StreamCall, count: int) -> list[notification_pb2.Notification]:
    """The next ``count`` notifications of the stream, skipping heartbeats."""
    out: list[notification_pb2.Notification] = []
    while len(out) < count:
        message = await read(call)
        if message.HasField("notification"):
            out.append(message.notification)
    return out


def subscribe(env: NotificationEnv, account: Account, resume: int = 0, replica: int = 0,
              parent: str = "users/me", heartbeat: int | None = None) -> StreamCall:
    request = notification_service_pb2.SubscribeRequest(parent=parent, resume_cursor=resume)
    if heartbeat is not None:
        request.heartbeat_interval_seconds = heartbeat
    return env.stubs[replica].Subscribe(request, metadata=account.auth)


@pytest.fixture
async def closing() -> AsyncIterator[list[StreamCall]]:
    """Calls to cancel when the test ends, passed or not."""
    calls: list[StreamCall] = []
    yield calls
    for call in calls:
        call.cancel()


async def test_a_subscriber_receives_what_is_sent_after_the_heartbeat(
    env: NotificationEnv, closing: list[StreamCall]
) -> None:
    ada = await env.account()
    await env.send(ada, Chan.CHANNEL_IN_APP, title="before")
    call = subscribe(env, ada)
    closing.append(call)
    first = await read(call)
    assert first.HasField("heartbeat")
    assert first.heartbeat.latest_cursor == 1 and not first.heartbeat.replay_truncated
    sent = await env.send(ada, Chan.CHANNEL_IN_APP, title="live")
    (got,) = await notifications(call, 1)
    assert (got.name, got.cursor, got.title) == (sent.name, 2, "live")


async def test_reconnecting_with_a_cursor_replays_exactly_the_missed_ones(
    env: NotificationEnv, closing: list[StreamCall]
) -> None:
    ada = await env.account()
    call = subscribe(env, ada)
    closing.append(call)
    await read(call)
    for i in range(2):
        await env.send(ada, Chan.CHANNEL_IN_APP, title=f"seen {i}")
    seen = await notifications(call, 2)
    call.cancel()
    missed = [await env.send(ada, Chan.CHANNEL_IN_APP, title=f"missed {i}", replica=i % 2) for i in range(3)]
    again = subscribe(env, ada, resume=seen[-1].cursor, replica=1)
    closing.append(again)
    heartbeat = await read(again)
    assert heartbeat.heartbeat.latest_cursor == 5
    replayed = await notifications(again, 3)
    assert [n.name for n in replayed] == [n.name for n in missed]
    assert [n.cursor for n in replayed] == [3, 4, 5]
    live = await env.send(ada, Chan.CHANNEL_IN_APP, title="after")
    (next_one,) = await notifications(again, 1)
    assert (next_one.name, next_one.cursor) == (live.name, 6), "no duplicate of the replay, nothing skipped"


async def test_notifications_reach_a_stream_on_another_replica_in_order(
    env: NotificationEnv, closing: list[StreamCall]
) -> None:
    ada = await env.account()
    call = subscribe(env, ada, replica=1)
    closing.append(call)
    await read(call)
    sent = await asyncio.gather(*(env.send(ada, Chan.CHANNEL_IN_APP, title=f"n{i}", replica=i % 2)
                                  for i in range(6)))
    got = await notifications(call, 6)
    assert [n.cursor for n in got] == [1, 2, 3, 4, 5, 6]
    assert sorted(n.name for n in got) == sorted(n.name for n in sent)


async def test_resuming_from_zero_replays_nothing_and_a_future_cursor_restarts_at_now(
    env: NotificationEnv, closing: list[StreamCall]
) -> None:
    ada = await env.account()
    for i in range(2):
        await env.send(ada, Chan.CHANNEL_IN_APP, title=f"old {i}")
    for resume in (0, 99):
        call = subscribe(env, ada, resume=resume)
        closing.append(call)
        assert (await read(call)).heartbeat.latest_cursor == 2
    sent = await env.send(ada, Chan.CHANNEL_IN_APP, title="new")
    for call in closing:
        assert [n.name for n in await notifications(call, 1)] == [sent.name]


async def test_nobody_subscribes_to_someone_elses_stream(env: NotificationEnv) -> None:
    ada, eve = await env.account(), await env.account()
    call = subscribe(env, eve, parent=ada.name)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(call.read(), READ_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    bad = env.stub.Subscribe(notification_service_pb2.SubscribeRequest(parent=ada.name, heartbeat_interval_seconds=1),
                             metadata=ada.auth)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await asyncio.wait_for(bad.read(), READ_TIMEOUT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_an_idle_stream_gets_periodic_heartbeats(env: NotificationEnv, closing: list[StreamCall]) -> None:
    ada = await env.account()
    call = subscribe(env, ada, heartbeat=5)
    closing.append(call)
    first = await read(call)
    second = await read(call)
    assert first.HasField("heartbeat") and second.HasField("heartbeat")
    gap = second.heartbeat.send_time.ToDatetime() - first.heartbeat.send_time.ToDatetime()
    assert 4.5 <= gap.total_seconds() < READ_TIMEOUT


async def test_a_draining_server_ends_streams_with_unavailable(env: NotificationEnv) -> None:
    ada = await env.account()
    extra = await start_service(env.settings, notification.build)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{extra.port}")
    try:
        stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
        call = stub.Subscribe(notification_service_pb2.SubscribeRequest(parent=ada.name), metadata=ada.auth)
        assert (await read(call)).HasField("heartbeat")
        await extra.stop(grace=0.2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()



async def test_draining_ends_streams_at_once_not_after_the_grace_period(env: NotificationEnv) -> None:
    ada = await env.account()
    extra = await start_service(env.settings, notification.build)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{extra.port}")
    try:
        stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
        call = stub.Subscribe(notification_service_pb2.SubscribeRequest(parent=ada.name), metadata=ada.auth)
        assert (await read(call)).HasField("heartbeat")
        stopping = asyncio.create_task(extra.stop(grace=60))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(call.read(), READ_TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "subscribe again" in (err.value.details() or "")
        await asyncio.wait_for(stopping, READ_TIMEOUT)
    finally:
        await channel.close()
