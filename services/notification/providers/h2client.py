"""A small HTTP/2 client over asyncio streams, on the ``h2`` protocol library.

APNs accepts HTTP/2 only and wants one long-lived connection carrying many concurrent requests
(opening one per notification is treated as abuse). ``h2`` is sans-IO: this module owns the
socket, one reader task that routes frames to the waiting request, and flow control. TLS
negotiates ``h2`` through ALPN; a loopback ``http://`` URL speaks HTTP/2 in clear text with
prior knowledge (RFC 9113 section 3.3), which is how tests talk to a local peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import urllib.parse
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from services.notification.providers.http import HttpResponse

READ_CHUNK = 65536


@dataclass
class _Stream:
    done: asyncio.Future[HttpResponse]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytearray = field(default_factory=bytearray)


class H2Client:
    """Requests to one origin over one HTTP/2 connection, reopened when it breaks."""

    def __init__(self, base_url: str, timeout: float) -> None:
        """Target ``base_url`` (https, or http for a loopback peer); ``timeout`` bounds each request."""
        parts = urllib.parse.urlsplit(base_url)
        self._tls = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._authority = parts.netloc
        self._timeout = timeout
        self._lock = asyncio.Lock()
        self._conn: h2.connection.H2Connection | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._streams: dict[int, _Stream] = {}
        self._window_open = asyncio.Event()

    async def _connect(self) -> h2.connection.H2Connection:
        async with self._lock:
            if self._conn is not None and self._writer is not None and not self._writer.is_closing():
                return self._conn
            context: ssl.SSLContext | None = None
            if self._tls:
                context = ssl.create_default_context()
                context.set_alpn_protocols(["h2"])
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self._host, self._port, ssl=context), self._timeout
            )
            if context is not None:
                ssl_object = writer.get_extra_info("ssl_object")
                if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                    writer.close()
                    raise OSError(f"{self._authority} did not negotiate HTTP/2")
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            writer.write(conn.data_to_send())
            await writer.drain()
            self._conn, self._writer = conn, writer
            self._reader_task = asyncio.create_task(self._read(conn, reader, writer), name="h2-reader")
            return conn

    async def _read(
        self, conn: h2.connection.H2Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        error: Exception = ConnectionError(f"{self._authority} closed the connection")
        try:
            while data := await reader.read(READ_CHUNK):
                for event in conn.receive_data(data):
                    if not self._handle(conn, event):
                        error = ConnectionError(f"{self._authority} sent GOAWAY")
                        return
                writer.write(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as failure:
            error = ConnectionError(f"HTTP/2 connection to {self._authority} failed: {failure!r}")
        finally:
            self._drop(conn, error)

    def _handle(self, conn: h2.connection.H2Connection, event: h2.events.Event) -> bool:
        """Route one event; False when the connection is going away."""
        if isinstance(event, h2.events.ResponseReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                headers = {str(k): str(v) for k, v in event.headers or []}
                stream.status = int(headers.pop(":status", "0"))
                stream.headers = headers
        elif isinstance(event, h2.events.DataReceived):
            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.body.extend(event.data or b"")
        elif isinstance(event, h2.events.StreamEnded):
            finished = self._streams.pop(event.stream_id, None)
            if finished is not None and not finished.done.done():
                finished.done.set_result(HttpResponse(finished.status, finished.headers, bytes(finished.body)))
        elif isinstance(event, h2.events.StreamReset):
            reset = self._streams.pop(event.stream_id, None)
            if reset is not None and not reset.done.done():
                reset.done.set_exception(ConnectionError(f"stream reset with error {event.error_code!r}"))
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_open.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            return False
        return True

    def _drop(self, conn: h2.connection.H2Connection, error: Exception) -> None:
        """Fail every request still waiting on ``conn`` and forget it, so the next request reconnects."""
        if self._conn is conn:
            self._conn = None
            if self._writer is not None:
                self._writer.close()
            self._writer = None
        for stream in self._streams.values():
            if not stream.done.done():
                stream.done.set_exception(error)
        self._streams.clear()
        self._window_open.set()

    async def request(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
        """Send one request and wait for its whole response; OSError on any transport failure."""
        try:
            return await asyncio.wait_for(self._request(method, path, headers, body), self._timeout)
        except (TimeoutError, ConnectionError, h2.exceptions.H2Error) as error:
            raise OSError(f"HTTP/2 request to {self._authority} failed: {error!r}") from error

    async def _request(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> HttpResponse:
        conn = await self._connect()
        writer = self._writer
        assert writer is not None
        stream_id = conn.get_next_available_stream_id()
        stream = _Stream(asyncio.get_running_loop().create_future())
        self._streams[stream_id] = stream
        pseudo = [(":method", method), (":scheme", "https" if self._tls else "http"),
                  (":authority", self._authority), (":path", path)]
        try:
            conn.send_headers(stream_id, [*pseudo, *headers, ("content-length", str(len(body)))], end_stream=not body)
            await self._send_body(conn, writer, stream_id, body)
            writer.write(conn.data_to_send())
            await writer.drain()
            return await stream.done
        except BaseException:
            # Timed out or failed half-way: forget the stream and tell the peer, if still connected.
            if self._streams.pop(stream_id, None) is not None and self._conn is conn:
                with contextlib.suppress(h2.exceptions.H2Error, OSError):
                    conn.reset_stream(stream_id)
                    writer.write(conn.data_to_send())
            raise

    async def _send_body(
        self, conn: h2.connection.H2Connection, writer: asyncio.StreamWriter, stream_id: int, body: bytes
    ) -> None:
        view = memoryview(body)
        while view:
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                # The peer's receive window is full: send what is queued and wait for WINDOW_UPDATE.
                writer.write(conn.data_to_send())
                self._window_open.clear()
                await self._window_open.wait()
                if self._conn is not conn:
                    raise ConnectionError(f"{self._authority} closed the connection")
                continue
            chunk, view = view[:window], view[window:]
            conn.send_data(stream_id, bytes(chunk), end_stream=not view)

    async def close(self) -> None:
        """Close the connection politely (GOAWAY) and stop the reader."""
        conn, writer, task = self._conn, self._writer, self._reader_task
        if conn is not None and writer is not None:
            with contextlib.suppress(OSError, h2.exceptions.H2Error):
                conn.close_connection()
                writer.write(conn.data_to_send())
                writer.close()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
        self._conn = self._writer = None
