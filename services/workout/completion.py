"""Completing a session in two steps, so that records and events survive a crash in between.

1. *Close*: one conditional write moves the session from in progress to completed and freezes
   its sets (LogSet, UpdateSet and DeleteSet only touch sessions in progress). The session is
   marked ``finalized: False``.
2. *Finalize*: the frozen sets are compared with the user's records, new records are written,
   SessionCompleted and one PersonalRecordAchieved per record go to the outbox, and the session
   gets its records and ``finalized: True``.

Finalizing is idempotent (records recognise the session that wrote them, events have
deterministic ids and the outbox drops a repeated id), so an interrupted completion is finished by
whoever comes next: a retried CompleteSession, the user's next StartSession (which must see the
records before a new session can beat them), or the background sweep for clients that never
come back. Each fact is thus published exactly once from the producer's side.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from services.runtime.events import EventSink
from services.runtime.storage import Document
from services.runtime.timeutil import now
from services.workout.catalog import Catalog
from services.workout.events import completion_events
from services.workout.records import candidates
from services.workout.repository import RecordRepository, SessionRepository

log = logging.getLogger("fittracker.workout.completion")

#: A completion unfinished for this long is taken over by the sweep: the call that closed the
#: session has died (a finishing call takes milliseconds).
STALE_AFTER = timedelta(seconds=30)
SWEEP_INTERVAL_SECONDS = 30.0


class Completer:
    """Finalizes completed sessions: personal records, then events, then the session's flag."""

    def __init__(self, sessions: SessionRepository, records: RecordRepository, sink: EventSink,
                 catalog: Catalog) -> None:
        """Write through the repositories and publish through ``sink`` (the outbox)."""
        self._sessions = sessions
        self._records = records
        self._sink = sink
        self._catalog = catalog

    async def finalize(self, session: Document) -> Document:
        """Finish the completion of a closed session; return it as stored afterwards."""
        if session.get("finalized", True):
            return session
        achieved = await self._records.apply(session["user_id"], session, candidates(session["sets"]))
        for envelope in completion_events(session, achieved, self._catalog):
            await self._sink.add(envelope)
        snapshot = [{k: v for k, v in r.items() if k != "_id"} for r in achieved]
        done = await self._sessions.mark_finalized(session, snapshot)
        if done is None:
            # A concurrent finalize of the same session won; it wrote the same records.
            stored = await self._sessions.get(session["user_id"], session["_id"])
            return stored or {**session, "finalized": True, "personal_records": snapshot}
        return done

    async def finalize_pending(self, user_id: str) -> None:
        """Finish any interrupted completion of the user's sessions."""
        for session in await self._sessions.unfinalized(user_id=user_id):
            await self.finalize(session)

    async def sweep_once(self, stale_after: timedelta = STALE_AFTER) -> int:
        """Finish completions interrupted longer than ``stale_after`` ago; return how many."""
        pending = await self._sessions.unfinalized(closed_before=now() - stale_after)
        for session in pending:
            await self.finalize(session)
        return len(pending)

    async def sweep(self) -> None:
        """Run ``sweep_once`` periodically (a background job); failures are logged and retried."""
        while True:
            try:
                finished = await self.sweep_once()
                if finished:
                    log.warning("finished interrupted session completions", extra={"fields": {"count": finished}})
            except Exception:
                log.exception("sweeping interrupted completions failed; retrying next round")
            # A periodic timer, not a synchronisation: nothing waits on this loop.
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)
