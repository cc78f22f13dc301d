"""The shared runtime on a real server: error mapping, metrics, draining, settings, worker processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.runtime.errors import NotFound
from services.runtime.resources import Resources
from services.runtime.server import RunningService, ServiceDefinition, start_service
from services.runtime.settings import Settings, SettingsError

SERVICE = "fittracker.test.v1.ProbeService"
ROOT = Path(__file__).resolve().parents[2]


async def boom(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
    raise RuntimeError("secret internals: password=hunter2")


async def missing(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
    raise NotFound("users/x not found")


async def ok(request: empty_pb2.Empty, context: Any) -> empty_pb2.Empty:
    return empty_pb2.Empty()


async def build_probe(settings: Settings, resources: Resources) -> ServiceDefinition:
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=empty_pb2.Empty.FromString, response_serializer=empty_pb2.Empty.SerializeToString
        )
        for name, fn in (("Boom", boom), ("Missing", missing), ("Ok", ok))
    }

    def register(server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    return ServiceDefinition(
        service_names=[SERVICE], register=register, public_methods={f"/{SERVICE}/{m}" for m in handlers}
    )


@pytest_asyncio.fixture
async def probe(tmp_path: Path) -> AsyncIterator[tuple[RunningService, grpc.aio.Channel]]:
    settings = Settings(service="user", environment="test", port=0, data_dir=tmp_path, log_level="WARNING")
    running = await start_service(settings, build_probe)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    yield running, channel
    await channel.close()
    await running.stop(grace=0)


def unary(channel: grpc.aio.Channel, method: str) -> Any:
    return channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=empty_pb2.Empty.FromString,
    )


async def test_unexpected_errors_become_internal_without_leaking(
    probe: tuple[RunningService, grpc.aio.Channel], caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(channel, "Boom")(empty_pb2.Empty())
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (err.value.details() or "")
    assert "trace id" in (err.value.details() or "")
    assert any("hunter2" in (r.exc_text or str(r.exc_info)) for r in caplog.records if r.exc_info)


async def test_domain_errors_keep_their_code_and_message(probe: tuple[RunningService, grpc.aio.Channel]) -> None:
    _, channel = probe
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(channel, "Missing")(empty_pb2.Empty())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "users/x not found"


async def test_metrics_count_calls_by_method_and_code(probe: tuple[RunningService, grpc.aio.Channel]) -> None:
    running, channel = probe
    for _ in range(3):
        await unary(channel, "Ok")(empty_pb2.Empty())
    with pytest.raises(grpc.aio.AioRpcError):
        await unary(channel, "Missing")(empty_pb2.Empty())
    registry = running.resources.metrics.registry
    labels = {"grpc_service": SERVICE, "grpc_method": "Ok", "grpc_code": "OK"}
    assert registry.get_sample_value("grpc_server_handled_total", labels) == 3
    assert registry.get_sample_value(
        "grpc_server_handled_total", {**labels, "grpc_method": "Missing", "grpc_code": "NOT_FOUND"}
    ) == 1
    assert registry.get_sample_value(
        "grpc_server_handling_seconds_count", {"grpc_service": SERVICE, "grpc_method": "Ok"}
    ) == 3
    assert registry.get_sample_value("grpc_server_in_flight", {"grpc_service": SERVICE, "grpc_method": "Ok"}) == 0


async def test_health_turns_not_serving_while_draining(probe: tuple[RunningService, grpc.aio.Channel]) -> None:
    running, channel = probe
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status == serving
    stopping = asyncio.create_task(running.stop(grace=1, drain_notice=0.5))
    for _ in range(100):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.01)
    assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await unary(channel, "Ok")(empty_pb2.Empty())  # still answering during the drain notice
    await stopping


@pytest.mark.parametrize(
    ("variable", "value", "needle"),
    [
        ("FITTRACKER_PORT", "http", "FITTRACKER_PORT must be a int"),
        ("FITTRACKER_WORKERS", "100", "FITTRACKER_WORKERS must be between"),
        ("FITTRACKER_LOG_LEVEL", "LOUD", "FITTRACKER_LOG_LEVEL must be one of"),
        ("FITTRACKER_MONGO_URL", "postgres://x", "FITTRACKER_MONGO_URL must start with"),
        ("FITTRACKER_ACCESS_TOKEN_TTL_SECONDS", "5", "FITTRACKER_ACCESS_TOKEN_TTL_SECONDS"),
    ],
)
def test_bad_settings_are_refused_naming_the_variable(variable: str, value: str, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        Settings.from_env("user", {variable: value})


def test_production_refuses_to_run_without_provisioned_keys() -> None:
    with pytest.raises(SettingsError, match="JWT_KEYS_DIR"):
        Settings.from_env("user", {"FITTRACKER_ENVIRONMENT": "production"})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_workers_share_one_port_and_stop_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "clients" / "python" / "generated")]),
        "FITTRACKER_PORT": str(port),
        "FITTRACKER_WORKERS": "2",
        "FITTRACKER_DATA_DIR": str(tmp_path),
        "FITTRACKER_DRAIN_NOTICE_SECONDS": "0",
        "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
        "FITTRACKER_LOG_LEVEL": "INFO",
    }
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "services.user"], env=env, stderr=subprocess.PIPE, cwd=ROOT, text=True
    )
    lines: list[str] = []
    both_serving = threading.Event()

    def read_log() -> None:
        assert supervisor.stderr is not None
        for line in supervisor.stderr:
            lines.append(line)
            if sum('"msg": "serving"' in seen for seen in lines) == 2:
                both_serving.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert both_serving.wait(timeout=30), "".join(lines)[-2000:]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
        reader.join(timeout=5)
    stderr = "".join(lines)
    assert supervisor.returncode == 0, stderr[-2000:]
    assert stderr.count('"msg": "serving"') == 2, stderr[-2000:]
    assert stderr.count('"msg": "stopped"') == 2, stderr[-2000:]


async def test_health_watch_streams_the_status(probe: tuple[RunningService, grpc.aio.Channel]) -> None:
    _, channel = probe
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    first = await watch.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

