"""Faults to inject into a running stack: a latency proxy between services, and process signals.

``LatencyProxy`` is a loopback TCP proxy with an adjustable delay, run on its own event loop in a
background thread. Put it between a caller and a service (the caller's ``FITTRACKER_<SERVICE>_ADDR``
names the proxy) and set ``delay``: every chunk in either direction then waits that long, which
is how a slow network or a slow dependency looks to gRPC. It is a few dozen lines rather than a
new binary (toxiproxy) because latency is the only toxic the fault matrix needs.

``hang`` and ``resume`` SIGSTOP and SIGCONT a process: a replica that hangs with its sockets open,
which the kernel still accepts connections for, unlike a dead one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from tools.devstack import Child


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that delays every chunk by ``delay`` seconds (0: pass-through)."""

    def __init__(self, upstreams: Sequence[tuple[str, int]], host: str = "127.0.0.1") -> None:
        """Forward each new connection to the next of ``upstreams`` in turn; ``start()`` listens."""
        if not upstreams:
            raise ValueError("a proxy needs at least one upstream")
        self.host = host
        self.port = 0
        self.delay = 0.0
        self.connections = 0
        #: Chunks forwarded so far (both directions): flat while nothing goes through.
        self.chunks = 0
        self._upstreams = itertools.cycle(list(upstreams))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="latency-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        """``host:port`` to give callers."""
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Listen on a free port (``self.port`` afterwards)."""
        self._thread.start()
        started: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, self.host, 0), self._loop)
        self._server = started.result(timeout=10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""

        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = next(self._upstreams)
        try:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                if self.delay > 0:
                    await asyncio.sleep(self.delay)
                self.chunks += 1
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()


def hang(child: Child) -> None:
    """SIGSTOP the process: it stops answering but keeps its sockets."""
    child.signal(signal.SIGSTOP)


def resume(child: Child) -> None:
    """SIGCONT a hung process."""
    child.signal(signal.SIGCONT)
