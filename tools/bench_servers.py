"""Reference servers the benchmarks compare the shared runtime with, one process each.

``python -m tools.bench_servers bare --port P`` serves the real user service's
handlers on a plain ``grpc.aio`` server: no interceptors (no tracing, auth, validation, metrics or
logs), no health or reflection. Only methods that need no caller work there (GetJwks): the
difference to ``python -m services.user`` on the same call is what the runtime costs.

``python -m tools.bench_servers sync --port P --threads N`` is the pattern of many
Python gRPC services (``grpc.server(ThreadPoolExecutor(N))``, handlers as plain functions) serving
the same GetJwks reply, the user service's own, built once at start.

``python -m tools.bench_servers ablate --port P --without CONCERN`` is the user service on the
shared runtime with one concern turned off (tracing, or one of the call pipeline's ``CONCERNS``):
the difference to the whole runtime is what that concern costs.

All read settings from ``FITTRACKER_*`` like the services, so they share the bench's keys.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
from fittracker.user.v1 import user_service_pb2, user_service_pb2_grpc

from services.runtime.interceptors import CONCERNS
from services.runtime.resources import Resources
from services.runtime.server import start_service
from services.runtime.settings import Settings
from services.user import build

#: What the ablation can turn off: the tracing interceptor and each concern of the call pipeline.
ABLATIONS = ("tracing", *CONCERNS)


def sync_jwks_handler(reply: user_service_pb2.GetJwksResponse) -> grpc.GenericRpcHandler:
    """GetJwks as a thread-pool server's handler: a plain function returning the prebuilt reply."""

    def get_jwks(request: user_service_pb2.GetJwksRequest, context: Any) -> user_service_pb2.GetJwksResponse:
        return reply

    return grpc.method_handlers_generic_handler("fittracker.user.v1.UserService", {
        "GetJwks": grpc.unary_unary_rpc_method_handler(
            get_jwks,
            request_deserializer=user_service_pb2.GetJwksRequest.FromString,
            response_serializer=user_service_pb2.GetJwksResponse.SerializeToString,
        ),
    })


async def jwks_reply(settings: Settings) -> user_service_pb2.GetJwksResponse:
    """The user service's own GetJwks reply, from its real handler."""
    resources = await Resources.open(settings)
    try:
        definition = await build(settings, resources)
        server = grpc.aio.server()
        definition.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = user_service_pb2_grpc.UserServiceStub(channel)
                return await stub.GetJwks(user_service_pb2.GetJwksRequest(), timeout=10)
        finally:
            await server.stop(0)
    finally:
        await resources.close()


async def serve_bare(settings: Settings, port: int) -> None:
    """The user service's handlers on a plain grpc.aio server, until SIGTERM."""
    resources = await Resources.open(settings)
    definition = await build(settings, resources)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    definition.register(server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    await resources.close()


async def serve_ablated(settings: Settings, port: int, without: str) -> None:
    """The user service on the runtime without ``without``, until SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_service(replace(settings, port=port), build, without=[without])
    await stop.wait()
    await running.stop(1)


def serve_sync(settings: Settings, port: int, threads: int) -> None:
    """GetJwks on grpc.server(ThreadPoolExecutor(threads)), until SIGTERM."""
    reply = asyncio.run(jwks_reply(settings))
    server = grpc.server(ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((sync_jwks_handler(reply),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    done = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal done
        done = True
        server.stop(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not done:
        server.wait_for_termination(timeout=0.5)


def main(argv: Sequence[str] | None = None) -> None:
    """Run one reference server."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("bare", "sync", "ablate"))
    parser.add_argument("--without", choices=ABLATIONS, help="the concern the ablate mode turns off")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=16, help="thread-pool size of the sync server")
    args = parser.parse_args(argv)
    settings = Settings.from_env("user")
    if args.mode == "bare":
        asyncio.run(serve_bare(settings, args.port))
    elif args.mode == "ablate":
        if not args.without:
            parser.error("ablate needs --without")
        asyncio.run(serve_ablated(settings, args.port, args.without))
    else:
        serve_sync(settings, args.port, args.threads)


if __name__ == "__main__":
    main()
