"""The event bus without Redis: one SQLite file shared by every service process of a machine.

It gives the quick start (``make up`` without Redis) the semantics of Redis Streams consumer
groups, so the services run the same consumer code on both:

- ``entries``: the append-only log. The AUTOINCREMENT id is the sequence: increasing across all
  streams, never reused (even after trimming). Dead letters are entries of ``<stream>.dead`` whose
  ``meta`` column says where they came from and why they died.
- ``offsets``: per (group, stream), the last entry id handed to a consumer of the group (Redis's
  last-delivered-id). A group starts at 0: the whole retained stream.
- ``pending``: per (group, stream, entry), the consumer holding it, its delivery count and the
  wall-clock time of the last claim (processes do not share a monotonic clock).

Every change is one ``BEGIN IMMEDIATE`` transaction, so consumers of several processes never take
the same new entry twice. Calls run inline on the event loop, as in the embedded document store
(``services/runtime/storage/embedded.py`` explains the measurements); each is well under a
millisecond.

Waiting for entries: a publish in this process wakes its consumers at once. Entries from other
processes are noticed by polling ``PRAGMA data_version`` every ``poll_interval`` seconds, which
changes only when another connection committed, and costs no disk read; only then does a consumer
look for new entries. Publishing trims each stream to about ``maxlen`` entries, like ``XADD MAXLEN ~``;
dead-letter streams are never trimmed here (they wait for an operator; the file is a quick-start store).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from fittracker.events.v1 import events_pb2

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

__all__ = ["EmbeddedBus"]

_T = TypeVar("_T")
_BUSY_TIMEOUT_MS = 5000
DEFAULT_MAXLEN = 100_000
#: A stream is trimmed on every this many publishes of this process (deleting is batched).
_TRIM_EVERY = 256
#: Even with no sign of change, a consumer looks for entries this often (a safety net).
_FORCED_CHECK_SECONDS = 2.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    body BLOB NOT NULL,
    meta TEXT,
    add_time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_stream ON entries (stream, id);
CREATE TABLE IF NOT EXISTS offsets (
    grp TEXT NOT NULL,
    stream TEXT NOT NULL,
    last_id INTEGER NOT NULL,
    PRIMARY KEY (grp, stream)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    grp TEXT NOT NULL,
    stream TEXT NOT NULL,
    entry_id INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    deliveries INTEGER NOT NULL,
    claim_time REAL NOT NULL,
    PRIMARY KEY (grp, stream, entry_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pending_by_claim ON pending (grp, claim_time);
"""


class EmbeddedBus(StreamBus):
    """An EventBus in one SQLite file; open one per process, on the same path for the machine."""

    system = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        poll_interval: float = 0.05,
        tuning: BusTuning | None = None,
        metrics: EventMetrics | None = None,
    ) -> None:
        """Open (creating if needed) the event log at ``path``."""
        super().__init__(tuning, metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._maxlen = maxlen
        self._poll_interval = poll_interval
        self._wakers: set[asyncio.Event] = set()
        self._published = 0
        # Switching a new file to WAL can answer "locked" at once while another process does the
        # same; services starting together retry briefly (as the embedded store does).
        deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._conn = self._open(path)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def _open(self, path: Path) -> sqlite3.Connection:
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up front).
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
            with self._transaction() as tx:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        tx.execute(statement)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _write(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        with self._transaction() as conn:
            return fn(conn)

    # --- the contract -------------------------------------------------------------------------------

    async def publish(self, envelope: events_pb2.EventEnvelope) -> str:
        """Append the envelope to its producer's stream and wake this process's consumers."""
        stream = envelope_stream(envelope)
        body = envelope.SerializeToString()
        self._published += 1
        trim = self._published % _TRIM_EVERY == 0

        def run(conn: sqlite3.Connection) -> int:
            cursor = conn.execute(
                "INSERT INTO entries (stream, body, add_time) VALUES (?, ?, ?)", (stream, body, time.time())
            )
            if trim:
                conn.execute(
                    "DELETE FROM entries WHERE stream = ? AND id <= "
                    "(SELECT id FROM entries WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (stream, stream, self._maxlen),
                )
            return int(cursor.lastrowid or 0)

        entry_id = self._write(run)
        self.metrics.published.labels(stream).inc()
        for waker in self._wakers:
            waker.set()
        return str(entry_id)

    async def close(self) -> None:
        """Close the SQLite connection."""
        self._conn.close()

    # --- inspection (operators and tests) -------------------------------------------------------------

    async def backlog(self, group: str, streams: Sequence[str]) -> int:
        """Entries of ``streams`` that ``group`` has not acknowledged yet (unread plus pending)."""
        total = 0
        for stream in streams:
            row = self._conn.execute(
                "SELECT last_id FROM offsets WHERE grp = ? AND stream = ?", (group, stream)
            ).fetchone()
            last = row[0] if row else 0
            total += self._conn.execute(
                "SELECT COUNT(*) FROM entries WHERE stream = ? AND id > ?", (stream, last)
            ).fetchone()[0]
            total += self._conn.execute(
                "SELECT COUNT(*) FROM pending WHERE grp = ? AND stream = ?", (group, stream)
            ).fetchone()[0]
        return int(total)

    async def dead_letter_count(self, stream: str) -> int:
        """How many entries wait in ``stream``'s dead-letter stream."""
        row = self._conn.execute("SELECT COUNT(*) FROM entries WHERE stream = ?", (dead_letter_stream(stream),))
        return int(row.fetchone()[0])

    async def dead_letters(self, stream: str, count: int = 100) -> list[DeadLetter]:
        """The oldest ``count`` dead letters of ``stream``."""
        rows = self._conn.execute(
            "SELECT id, body, meta FROM entries WHERE stream = ? ORDER BY id LIMIT ?",
            (dead_letter_stream(stream), count),
        ).fetchall()
        letters = []
        for entry_id, body, meta in rows:
            info = json.loads(meta or "{}")
            letters.append(
                DeadLetter(
                    dead_entry_id=str(entry_id),
                    stream=str(info.get("stream", stream)),
                    entry_id=str(info.get("entry_id", "")),
                    group=str(info.get("group", "")),
                    error=str(info.get("error", "")),
                    deliveries=int(info.get("deliveries", 0)),
                    body=bytes(body),
                )
            )
        return letters

    # --- the primitives of the consumer loop ------------------------------------------------------------

    async def _prepare(self, state: ConsumerState) -> None:
        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO offsets (grp, stream, last_id) VALUES (?, ?, 0)",
                [(state.group, stream) for stream in state.streams],
            )

        self._write(run)
        waker = asyncio.Event()
        waker.set()
        self._wakers.add(waker)
        state.extra.update(waker=waker, version=None, more=True, next_check=0.0)

    async def _release(self, state: ConsumerState) -> None:
        waker = state.extra.get("waker")
        if waker is not None:
            self._wakers.discard(waker)

    def _has_new(self, state: ConsumerState) -> bool:
        """Whether any stream has entries past the group's offset (a read, no write lock)."""
        marks = ",".join("?" * len(state.streams))
        row = self._conn.execute(
            f"SELECT 1 FROM offsets o JOIN entries e ON e.stream = o.stream AND e.id > o.last_id "  # noqa: S608 - only placeholders are interpolated
            f"WHERE o.grp = ? AND o.stream IN ({marks}) LIMIT 1",
            (state.group, *state.streams),
        ).fetchone()
        return row is not None

    def _take_new(self, state: ConsumerState) -> list[Delivery]:
        now = time.time()
        batch = self.tuning.batch_size

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            taken: list[Delivery] = []
            for stream in state.streams:
                row = conn.execute(
                    "SELECT last_id FROM offsets WHERE grp = ? AND stream = ?", (state.group, stream)
                ).fetchone()
                rows = conn.execute(
                    "SELECT id, body FROM entries WHERE stream = ? AND id > ? ORDER BY id LIMIT ?",
                    (stream, row[0] if row else 0, batch),
                ).fetchall()
                if not rows:
                    continue
                conn.execute(
                    "INSERT INTO offsets (grp, stream, last_id) VALUES (?, ?, ?) "
                    "ON CONFLICT (grp, stream) DO UPDATE SET last_id = excluded.last_id",
                    (state.group, stream, rows[-1][0]),
                )
                conn.executemany(
                    "INSERT INTO pending (grp, stream, entry_id, consumer, deliveries, claim_time) "
                    "VALUES (?, ?, ?, ?, 1, ?)",
                    [(state.group, stream, entry_id, state.name, now) for entry_id, _ in rows],
                )
                taken += [Delivery(stream, str(entry_id), bytes(body), 1) for entry_id, body in rows]
            return taken

        return self._write(run)

    async def _fetch(self, state: ConsumerState, wait_seconds: float) -> list[Delivery]:
        waker: asyncio.Event = state.extra["waker"]
        deadline = time.monotonic() + wait_seconds
        while True:
            now = time.monotonic()
            version = self._conn.execute("PRAGMA data_version").fetchone()[0]
            if waker.is_set() or state.extra["more"] or version != state.extra["version"] or (
                now >= state.extra["next_check"]
            ):
                # Cleared before looking, so a publish from now on wakes the wait below.
                waker.clear()
                state.extra.update(version=version, next_check=now + _FORCED_CHECK_SECONDS)
                taken = self._take_new(state) if self._has_new(state) else []
                # More may be waiting (a full batch, or another consumer of this process took some).
                state.extra["more"] = bool(taken)
                if taken:
                    return taken
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # coincides with its timeout, and a consumer that ignores cancellation never stops.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, self._poll_interval)):
                    await waker.wait()

    def _claim_rows(
        self, conn: sqlite3.Connection, state: ConsumerState, keys: list[tuple[str, int]]
    ) -> list[Delivery]:
        """Make ``keys`` pending for this consumer with one more delivery; read their bodies."""
        now = time.time()
        claimed: list[Delivery] = []
        for stream, entry_id in keys:
            conn.execute(
                "UPDATE pending SET consumer = ?, deliveries = deliveries + 1, claim_time = ? "
                "WHERE grp = ? AND stream = ? AND entry_id = ?",
                (state.name, now, state.group, stream, entry_id),
            )
            deliveries = conn.execute(
                "SELECT deliveries FROM pending WHERE grp = ? AND stream = ? AND entry_id = ?",
                (state.group, stream, entry_id),
            ).fetchone()[0]
            body = conn.execute("SELECT body FROM entries WHERE id = ?", (entry_id,)).fetchone()
            claimed.append(Delivery(stream, str(entry_id), bytes(body[0]) if body else None, int(deliveries)))
        return claimed

    async def _claim(self, state: ConsumerState, stream: str, entry_id: str, min_idle: float) -> Delivery | None:
        idle_since = time.time() - min_idle

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            row = conn.execute(
                "SELECT 1 FROM pending WHERE grp = ? AND stream = ? AND entry_id = ? AND claim_time <= ?",
                (state.group, stream, int(entry_id), idle_since),
            ).fetchone()
            return self._claim_rows(conn, state, [(stream, int(entry_id))]) if row else []

        claimed = self._write(run)
        return claimed[0] if claimed else None

    async def _reclaim(self, state: ConsumerState) -> list[Delivery]:
        idle_since = time.time() - self.tuning.claim_idle_seconds
        marks = ",".join("?" * len(state.streams))

        def run(conn: sqlite3.Connection) -> list[Delivery]:
            keys = conn.execute(
                f"SELECT stream, entry_id FROM pending WHERE grp = ? AND claim_time <= ? "  # noqa: S608 - only placeholders are interpolated
                f"AND stream IN ({marks}) ORDER BY entry_id LIMIT ?",
                (state.group, idle_since, *state.streams, self.tuning.batch_size),
            ).fetchall()
            return self._claim_rows(conn, state, [(str(s), int(e)) for s, e in keys])

        return self._write(run)

    async def _ack(self, state: ConsumerState, delivery: Delivery) -> None:
        self._conn.execute(
            "DELETE FROM pending WHERE grp = ? AND stream = ? AND entry_id = ?",
            (state.group, delivery.stream, int(delivery.entry_id)),
        )

    async def _dead_letter(self, state: ConsumerState, delivery: Delivery, error: str) -> None:
        meta = json.dumps({
            "stream": delivery.stream,
            "entry_id": delivery.entry_id,
            "group": state.group,
            "error": error[:2000],
            "deliveries": delivery.deliveries,
            "dead_time": datetime.now(UTC).isoformat(),
        })

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO entries (stream, body, meta, add_time) VALUES (?, ?, ?, ?)",
                (dead_letter_stream(delivery.stream), delivery.body or b"", meta, time.time()),
            )
            conn.execute(
                "DELETE FROM pending WHERE grp = ? AND stream = ? AND entry_id = ?",
                (state.group, delivery.stream, int(delivery.entry_id)),
            )

        self._write(run)
