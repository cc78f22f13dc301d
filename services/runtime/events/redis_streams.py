"""The event bus on Redis Streams: one stream per producer, consumer groups, dead-letter streams.

Mapping of the shared consumer loop (``bus.py``) onto Redis commands:

- publish: ``XADD events.<producer> MAXLEN ~ <maxlen> * envelope <bytes> event_type .. event_id ..``.
  ``~`` lets Redis trim whole radix-tree nodes instead of exactly ``maxlen`` entries, which is far
  cheaper; the stream keeps at least ``maxlen`` entries. Trimming does not wait for consumer groups:
  ``maxlen`` must cover the longest a group may fall behind (the default keeps 100,000 events per
  producer). A pending entry trimmed away is reported as lost.
- groups: ``XGROUP CREATE <stream> <group> 0 MKSTREAM`` (BUSYGROUP means it exists): a new group
  starts from the beginning of the stream, so nothing published before it existed is missed.
- new entries: ``XREADGROUP GROUP <group> <consumer> COUNT n BLOCK ms STREAMS ... >``. The block
  (``BusTuning.block_seconds``, 1 s) must stay below the client's ``socket_timeout`` (redis-py 8
  defaults to 5 s), or an idle stream would read as a timeout.
- ack: ``XACK``; retry of a failed entry: ``XCLAIM`` of that id to ourselves with a min-idle
  equal to the backoff (so an entry another consumer has reclaimed meanwhile is left to it);
  abandoned entries: ``XAUTOCLAIM ... <claim_idle>``; both raise the entry's delivery count,
  read back with ``XPENDING``.
- dead letters: ``MULTI; XADD <stream>.dead ...; XACK; EXEC``.

Consumers are named ``host-pid-n``. A consumer that stops with nothing pending removes itself
from the group (``XGROUP DELCONSUMER``); one that died keeps its name until its entries are
reclaimed, which is how operators can see it in ``XINFO CONSUMERS``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from fittracker.events.v1 import events_pb2
from redis.exceptions import RedisError, ResponseError

from services.runtime.events.bus import (
    BusTuning,
    ConsumerState,
    DeadLetter,
    Delivery,
    EventMetrics,
    StreamBus,
    dead_letter_stream,
    envelope_stream,
)

__all__ = ["RedisStreamsBus"]

log = logging.getLogger("fittracker.events")

#: Entries kept per producer stream (approximately, see the module docstring).
DEFAULT_MAXLEN = 100_000
#: Dead letters kept per stream; they wait for an operator, so they are kept much longer.
DEAD_MAXLEN = 100_000
_ENVELOPE = b"envelope"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _body(fields: Any) -> bytes | None:
    """The envelope field of an entry's fields (None for an entry that no longer exists)."""
    value = fields.get(_ENVELOPE) if isinstance(fields, dict) else None
    return bytes(value) if isinstance(value, bytes) else None


def _stream_entries(reply: Any) -> Iterable[tuple[str, str, dict[bytes, bytes] | None]]:
    """(stream, entry id, fields) from an XREADGROUP reply, in RESP2 (list) or RESP3 (dict) shape."""
    pairs = reply.items() if isinstance(reply, dict) else reply or []
    for stream, entries in pairs:
        for entry in entries:
            yield _text(stream), _text(entry[0]), entry[1]


class RedisStreamsBus(StreamBus):
    """An EventBus on Redis Streams, shared by every replica of every service."""

    system = "redis"

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        tuning: BusTuning | None = None,
        metrics: EventMetrics | None = None,
    ) -> None:
        """Publish and consume through ``redis``, a client that returns bytes (not decoded text).

        The bus does not own the client: ``close`` leaves it open for its other users.
        """
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("RedisStreamsBus needs a client without decode_responses: envelopes are binary")
        super().__init__(tuning, metrics)
        self._redis = redis
        self._maxlen = maxlen

    async def publish(self, envelope: events_pb2.EventEnvelope) -> str:
        """XADD the envelope to its producer's stream, trimming it to about ``maxlen`` entries."""
        stream = envelope_stream(envelope)
        entry_id = await self._redis.xadd(
            stream,
            {_ENVELOPE: envelope.SerializeToString(), "event_type": envelope.event_type, "event_id": envelope.event_id},
            maxlen=self._maxlen,
            approximate=True,
        )
        self.metrics.published.labels(stream).inc()
        return _text(entry_id)

    async def close(self) -> None:
        """Nothing to release: the Redis client belongs to the caller."""

    # --- inspection (operators and tests) ---------------------------------------------------------

    async def backlog(self, group: str, streams: Sequence[str]) -> int:
        """Entries of ``streams`` that ``group`` has not acknowledged yet (unread plus pending)."""
        total = 0
        for stream in streams:
            try:
                groups = await self._redis.xinfo_groups(stream)
            except ResponseError:
                continue  # no such stream yet
            mine = [info for info in groups if _text(info["name"]) == group]
            if not mine:
                total += int(await self._redis.xlen(stream))  # the group will start from the beginning
            for info in mine:
                lag = info.get("lag")
                if lag is None:
                    # Redis cannot tell after trims or deletions: count what lies past the group's cursor.
                    after = await self._redis.xrange(stream, f"({_text(info['last-delivered-id'])}", "+")
                    lag = len(after or [])
                total += int(lag) + int(info["pending"])
        return total

    async def dead_letter_count(self, stream: str) -> int:
        """How many entries wait in ``stream``'s dead-letter stream."""
        return int(await self._redis.xlen(dead_letter_stream(stream)))

    async def dead_letters(self, stream: str, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``stream``."""
        entries = await self._redis.xrange(dead_letter_stream(stream), "-", "+", count=count) or []
        letters = []
        for entry_id, raw in entries:
            fields = raw or {}
            letters.append(
                DeadLetter(
                    dead_entry_id=_text(entry_id),
                    stream=_text(fields.get(b"stream", b"")),
                    entry_id=_text(fields.get(b"entry_id", b"")),
                    group=_text(fields.get(b"group", b"")),
                    error=_text(fields.get(b"error", b"")),
                    deliveries=int(fields.get(b"deliveries", 0)),
                    body=_body(fields) or b"",
                )
            )
        return letters

    # --- the primitives of the consumer loop --------------------------------------------------------

    async def _prepare(self, state: ConsumerState) -> None:
        for stream in state.streams:
            try:
                await self._redis.xgroup_create(stream, state.group, id="0", mkstream=True)
            except ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        state.extra["cursors"] = dict.fromkeys(state.streams, "0-0")

    async def _fetch(self, state: ConsumerState, wait_seconds: float) -> list[Delivery]:
        block = int(wait_seconds * 1000)
        reply = await self._redis.xreadgroup(
            state.group,
            state.name,
            dict.fromkeys(state.streams, ">"),
            count=self.tuning.batch_size,
            # BLOCK 0 would wait forever; no BLOCK at all returns at once.
            block=block if block > 0 else None,
        )
        return [
            Delivery(stream, entry_id, _body(fields), 1)
            for stream, entry_id, fields in _stream_entries(reply)
        ]

    async def _claim(self, state: ConsumerState, stream: str, entry_id: str, min_idle: float) -> Delivery | None:
        claimed: list[Any] = await self._redis.xclaim(
            stream, state.group, state.name, int(min_idle * 1000), [entry_id]
        )
        if not claimed:
            return None
        counts = await self._delivery_counts(state, stream, [entry_id])
        return Delivery(stream, entry_id, _body(claimed[0][1]), counts.get(entry_id, 1))

    async def _reclaim(self, state: ConsumerState) -> list[Delivery]:
        deliveries: list[Delivery] = []
        cursors: dict[str, str] = state.extra["cursors"]
        idle_ms = int(self.tuning.claim_idle_seconds * 1000)
        for stream in state.streams:
            reply = await self._redis.xautoclaim(
                stream, state.group, state.name, idle_ms, cursors[stream], count=self.tuning.batch_size
            )
            # A cursor of 0-0 means the scan reached the end; the next one starts over.
            cursors[stream] = _text(reply[0])
            for deleted in reply[2] if len(reply) > 2 else ():
                log.error(
                    "pending entry was trimmed from its stream before it was handled",
                    extra={"fields": {"group": state.group, "stream": stream, "entry_id": _text(deleted)}},
                )
                self.metrics.consumed.labels(state.group, stream, "lost").inc()
            claimed = [(_text(entry_id), fields) for entry_id, fields in reply[1]]
            if not claimed:
                continue
            counts = await self._delivery_counts(state, stream, [entry_id for entry_id, _ in claimed])
            deliveries += [
                Delivery(stream, entry_id, _body(fields), counts.get(entry_id, 1))
                for entry_id, fields in claimed
            ]
            log.info(
                "reclaimed abandoned entries",
                extra={"fields": {"group": state.group, "stream": stream, "count": len(claimed)}},
            )
        return deliveries

    async def _delivery_counts(self, state: ConsumerState, stream: str, entry_ids: list[str]) -> dict[str, int]:
        """The delivery count of each of ``entry_ids``, exactly (one XPENDING per id, one round trip)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(stream, state.group, min=entry_id, max=entry_id, count=1)
            replies: list[Any] = await pipe.execute()
        return {_text(p["message_id"]): int(p["times_delivered"]) for reply in replies for p in reply or ()}

    async def _ack(self, state: ConsumerState, delivery: Delivery) -> None:
        await self._redis.xack(delivery.stream, state.group, delivery.entry_id)

    async def _dead_letter(self, state: ConsumerState, delivery: Delivery, error: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                dead_letter_stream(delivery.stream),
                {
                    _ENVELOPE: delivery.body or b"",
                    "stream": delivery.stream,
                    "entry_id": delivery.entry_id,
                    "group": state.group,
                    "error": error[:2000],
                    "deliveries": delivery.deliveries,
                    "dead_time": datetime.now(UTC).isoformat(),
                },
                maxlen=DEAD_MAXLEN,
                approximate=True,
            )
            pipe.xack(delivery.stream, state.group, delivery.entry_id)
            await pipe.execute()

    async def _release(self, state: ConsumerState) -> None:
        """Leave the group if nothing is pending for this consumer; best effort, bounded."""
        try:
            async with asyncio.timeout(1.0):
                for stream in state.streams:
                    mine = await self._redis.xpending_range(stream, state.group, "-", "+", 1, consumername=state.name)
                    if mine:
                        return  # keep the name: its entries are reclaimed by the others
                for stream in state.streams:
                    await self._redis.xgroup_delconsumer(stream, state.group, state.name)
        except (RedisError, OSError, TimeoutError):
            pass  # the name lingers in XINFO CONSUMERS; harmless
