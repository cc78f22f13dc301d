"""Two replicas of the user service over MongoDB with the shared Redis cache: no stale reads."""

from __future__ import annotations

import grpc
from fittracker.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from google.protobuf.field_mask_pb2 import FieldMask

from services.runtime.server import start_service
from services.user import build
from tests.support import bearer
from tests.user.conftest import settings_for


async def test_a_write_on_one_replica_is_read_at_once_on_the_other(
    tmp_path_factory: object, mongo_url: str, redis_url: str
) -> None:
    data_dir = tmp_path_factory.mktemp("user-cache")  # type: ignore[attr-defined]
    settings = settings_for("mongo", data_dir, mongo_url, redis_url)
    replicas = [await start_service(settings, build) for _ in range(2)]
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{r.port}") for r in replicas]
    first, second = (user_service_pb2_grpc.UserServiceStub(c) for c in channels)
    try:
        account = await first.Register(user_service_pb2.RegisterRequest(
            email="cached@example.com", password="cache me if you can", display_name="Before"))
        auth = bearer(account.tokens.access_token)
        me = user_service_pb2.GetUserRequest(name="users/me")
        for stub in (first, second, first, second):  # both replicas now hold the profile in L1
            assert (await stub.GetUser(me, metadata=auth)).display_name == "Before"
        for round_, (writer, reader) in enumerate(((first, second), (second, first))):
            name = f"After {round_}"
            await writer.UpdateUser(
                user_service_pb2.UpdateUserRequest(
                    user=user_pb2.User(name="users/me", display_name=name),
                    update_mask=FieldMask(paths=["display_name"]),
                ),
                metadata=auth,
            )
            assert (await reader.GetUser(me, metadata=auth)).display_name == name
        hits = replicas[0].resources.metrics.registry.get_sample_value(
            "cache_lookups_total", {"cache": "users", "layer": "l1", "result": "hit"}
        )
        assert hits and hits >= 1
    finally:
        for channel in channels:
            await channel.close()
        for replica in replicas:
            await replica.stop(grace=0)
