"""Helpers every service's tests share: settings per storage backend, call metadata, error details."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.runtime.settings import ServiceName, Settings

#: The two ways a service runs: the embedded store and bus alone, or MongoDB (FerretDB) with Redis.
BACKENDS = ("embedded", "mongo")


def backend_settings(
    service: ServiceName, backend: str, data_dir: Path, mongo_url: str, redis_url: str, **overrides: Any
) -> Settings:
    """Test settings of ``service`` on ``backend``: free port, its own database, cheap argon2, quiet logs."""
    values: dict[str, Any] = {
        "service": service,
        "environment": "test",
        "port": 0,
        "data_dir": data_dir,
        "mongo_url": mongo_url if backend == "mongo" else "",
        "mongo_database": f"{service}_{uuid.uuid4().hex[:8]}",
        "redis_url": redis_url if backend == "mongo" else "",
        "argon2_memory_kib": 1024,
        "argon2_time_cost": 1,
        "log_level": "WARNING",
        # Short, where production derives them from the longest call: no call in these tests lasts 1 s.
        "revocation_poll_seconds": 0.2,
        "erasure_delay_seconds": 0.5,
        **overrides,
    }
    return Settings(**values)


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata carrying an access token."""
    return (("authorization", f"Bearer {token}"),)


def field_violations(error: grpc.aio.AioRpcError) -> list[str]:
    """The fields named by the BadRequest detail of an INVALID_ARGUMENT."""
    status = rpc_status.from_call(error)
    assert status is not None, "INVALID_ARGUMENT must carry rich details"
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields
