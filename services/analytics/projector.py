"""The event side of analytics: turns workout and user events into the read models.

``Projector.handle`` is the consumer group "analytics"'s handler. It may see an event twice (the
bus delivers at least once) or two events of one user at the same time (several replicas), so:

* per-session figures are *set* under the session id (``repository`` explains why that is
  idempotent), never incremented;
* streaks and all-time totals are recomputed from the stored sessions and written with a
  compare-and-set on the stats document's version, retried a bounded number of times;
* milestones go into the stats document (``pending_milestones``) in that same compare-and-set,
  are then handed to the outbox under deterministic event ids, and only then cleared, so a crash
  in between publishes them on the next delivery instead of losing or doubling them.

Events of a deleted user (they may arrive after UserDeleted, from another stream) are dropped, and
a session handled while its user was being erased is erased again at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import date, datetime, timedelta
from typing import Any

from fittracker.events.v1 import events_pb2

from services.analytics.projections import (
    LocalTime,
    Run,
    advance_streak,
    field_key,
    last_segment,
    month_key,
    run_containing,
    session_entry,
    trend_entries,
)
from services.analytics.repository import AnalyticsRepository, version_filter
from services.runtime.errors import Aborted
from services.runtime.events import EventSink, data_erased, fact_id, make_envelope
from services.runtime.storage import Document, DuplicateKeyError
from services.runtime.timeutil import from_timestamp, now

log = logging.getLogger("fittracker.analytics")

PRODUCER = "analytics"
#: Compare-and-set attempts on one stats document before the event is left for redelivery.
MAX_CAS_ATTEMPTS = 16
#: How far either side of a session's day the first streak walk reads; widened a year at a time.
STREAK_WINDOW = timedelta(days=62)
STREAK_WIDEN = timedelta(days=366)
#: A streak walk stops widening after this many rounds (a 30-year streak).
MAX_STREAK_ROUNDS = 30
#: Sealed platform figures of a day are re-checked when an event for it arrives this late.
LATE_AFTER_DAYS = 1


Clock = Callable[[], datetime]


class Projector:
    """Applies events to the analytics read models."""

    def __init__(self, repo: AnalyticsRepository, outbox: EventSink, clock: Clock = now) -> None:
        """Write to ``repo``; publish through ``outbox``; ``clock`` says what "late" means."""
        self._repo = repo
        self._outbox = outbox
        self._clock = clock
        self._routes: dict[str, Callable[[events_pb2.EventEnvelope, str], Awaitable[None]]] = {
            "session_completed": self._on_session_completed,
            "personal_record_achieved": self._on_personal_record,
            "user_registered": self._on_user_registered,
            "user_deleted": self._on_user_deleted,
        }

    async def handle(self, envelope: events_pb2.EventEnvelope) -> None:
        """Apply one event; events analytics does not use are ignored (and so acknowledged)."""
        route = self._routes.get(envelope.WhichOneof("payload") or "")
        user_id = envelope.user.removeprefix("users/")
        if route is None or not user_id or "/" in user_id:
            return
        await route(envelope, user_id)

    # --- sessions -------------------------------------------------------------------------------

    async def _on_session_completed(self, envelope: events_pb2.EventEnvelope, user_id: str) -> None:
        if await self._repo.tombstone(user_id) is not None:
            return
        payload = envelope.session_completed
        session_key = field_key(last_segment(payload.session) or envelope.event_id)
        entry = session_entry(envelope)
        await self._repo.put_session(user_id, session_key, entry)
        trends = trend_entries(envelope)
        await self._repo.mirror_exercises(trends)
        for exercise_id, trend in trends.items():
            await self._repo.put_trend(user_id, exercise_id, session_key, trend)
        await self._update_stats(user_id, entry, from_timestamp(envelope.occur_time))
        await self._mark_platform(user_id, entry["end"], {f"sessions.{session_key}": True})
        await self._erase_if_deleted_meanwhile(user_id)

    async def _update_stats(self, user_id: str, entry: Document, occurred: datetime) -> None:
        """Recompute the streak and the month's subtotal, and store them with a compare-and-set."""
        day = date.fromisoformat(entry["date"])
        event_day = LocalTime.of(occurred, entry["tz"]).day
        for _ in range(MAX_CAS_ATTEMPTS):
            current = await self._repo.stats.get(user_id)
            run, month_doc = await self._streak_run(user_id, day, entry["month"])
            state = current or {}
            update = advance_streak(
                Run.from_doc(state.get("latest_run")),
                Run.from_doc(state.get("longest_run")),
                list(state.get("milestones", [])),
                run,
                event_day,
            )
            sessions = month_doc.get("sessions", {}).values() if month_doc else ()
            fields: dict[str, Any] = {
                "latest_run": update.latest.as_doc(),
                "longest_run": update.longest.as_doc(),
                "milestones": update.records,
                f"months.{entry['month']}": {
                    "sessions": len(sessions), "volume": sum(float(s["volume"]) for s in sessions),
                },
                "update_time": now(),
                "version": int(state.get("version", 0)) + 1,
            }
            pending = [
                {"days": days, "date": reached.isoformat(), "session": entry["session"]}
                for days, reached in update.reached
            ]
            if pending:
                fields["pending_milestones"] = [*state.get("pending_milestones", []), *pending]
            last = state.get("last_session_time")
            if last is None or entry["end"] >= last:
                fields |= {"last_session_time": entry["end"], "time_zone": entry["tz"]}
            if await self._store_stats(user_id, current, fields):
                break
        else:
            raise Aborted(f"stats of users/{user_id} kept changing; leaving the event for redelivery")
        await self._publish_pending(user_id)

    async def _store_stats(self, user_id: str, current: Document | None, fields: dict[str, Any]) -> bool:
        """Write ``fields`` if the stats document is still as read; False when someone else won."""
        if current is None:
            doc: Document = {"_id": user_id, "create_time": now(), "months": {}}
            for path, value in fields.items():
                if path.startswith("months."):
                    doc["months"][path.split(".", 1)[1]] = value
                else:
                    doc[path] = value
            try:
                await self._repo.stats.insert(doc)
            except DuplicateKeyError:
                return False
            return True
        return await self._repo.stats.update_one(version_filter(user_id, current), {"$set": fields}) is not None

    async def _streak_run(self, user_id: str, day: date, month: str) -> tuple[Run, Document | None]:
        """The run of active days holding ``day``, read from the month documents around it.

        Also returns the month document of ``month`` (read on the way) for its subtotal.
        """
        low, high = day - STREAK_WINDOW, day + STREAK_WINDOW
        for _ in range(MAX_STREAK_ROUNDS):
            docs = await self._repo.month_docs(user_id, month_key(low), month_key(high))
            active = {date.fromisoformat(e["date"]) for d in docs for e in d.get("sessions", {}).values()}
            run = run_containing(active | {day}, day)
            month_doc = next((d for d in docs if d["month"] == month), None)
            # Days outside whole months of the window were read too; only the window is certain.
            if run.start > low and run.end < high:
                return run, month_doc
            if run.start <= low:
                low -= STREAK_WIDEN
            if run.end >= high:
                high += STREAK_WIDEN
        return run, month_doc

    async def _publish_pending(self, user_id: str) -> None:
        """Hand recorded milestones to the outbox, then clear them (see the module docstring)."""
        stats = await self._repo.stats.get(user_id)
        for item in (stats or {}).get("pending_milestones", []):
            payload = events_pb2.StreakMilestoneReached(streak_days=item["days"], session=item["session"])
            await self._outbox.add(
                make_envelope(
                    PRODUCER,
                    user_id,
                    payload,
                    event_id=milestone_event_id(user_id, item["days"], item["date"]),
                )
            )
            await self._repo.stats.update_one({"_id": user_id}, {"$pull": {"pending_milestones": item}})

    # --- records, registrations ---------------------------------------------------------------

    async def _on_personal_record(self, envelope: events_pb2.EventEnvelope, user_id: str) -> None:
        if await self._repo.tombstone(user_id) is not None:
            return
        record = envelope.personal_record_achieved
        exercise_id = last_segment(record.exercise)
        # Keyed on what the record is, so a record published twice is still one timeline entry.
        record_key = field_key(last_segment(record.personal_record) or envelope.event_id)
        session_key = field_key(last_segment(record.session) or envelope.event_id)
        await self._repo.put_record(
            f"{user_id}:{record_key}:{session_key}",
            {
                "user_id": user_id,
                "exercise": exercise_id,
                "kind": int(record.kind),
                "value": record.value,
                "previous_value": record.previous_value if record.HasField("previous_value") else None,
                "weight_kg": record.weight_kg,
                "reps": record.reps,
                "session": record.session,
                "achieve_time": from_timestamp(envelope.occur_time),
            },
        )
        if exercise_id:
            await self._repo.mirror_exercises([exercise_id])
        await self._repo.stats.update_one(
            {"_id": user_id},
            {"$set": {"update_time": now()}, "$setOnInsert": {"version": 0, "create_time": now(), "months": {}}},
            upsert=True,
        )
        await self._erase_if_deleted_meanwhile(user_id)

    async def _on_user_registered(self, envelope: events_pb2.EventEnvelope, user_id: str) -> None:
        if await self._repo.tombstone(user_id) is not None:
            return
        await self._repo.touch_user(user_id)
        await self._mark_platform(user_id, from_timestamp(envelope.occur_time), {"registered": True})
        await self._erase_if_deleted_meanwhile(user_id)

    async def _mark_platform(self, user_id: str, instant: datetime, fields: dict[str, Any]) -> None:
        """Record platform activity on the instant's UTC day; re-open sealed figures it changes."""
        day = instant.date()
        await self._repo.mark_activity(day, user_id, fields)
        today = self._clock().date()
        if day < today - timedelta(days=LATE_AFTER_DAYS):
            stale = [f"day:{day.isoformat()}"]
            sunday = day + timedelta(days=6 - day.weekday())
            if sunday < today - timedelta(days=LATE_AFTER_DAYS):
                stale.append(f"week:{(day - timedelta(days=day.weekday())).isoformat()}")
            await self._repo.invalidate_rollups(stale)

    # --- erasure --------------------------------------------------------------------------------

    async def _on_user_deleted(self, envelope: events_pb2.EventEnvelope, user_id: str) -> None:
        request_id = envelope.user_deleted.deletion_request_id
        stone = await self._repo.bury(user_id, request_id)
        await self._repo.erase_user(user_id, stone["anonymous_key"])
        await self._outbox.add(data_erased(PRODUCER, user_id, request_id))

    async def _erase_if_deleted_meanwhile(self, user_id: str) -> None:
        """Undo what this event wrote if the user was deleted while it was being handled."""
        stone = await self._repo.tombstone(user_id)
        if stone is not None:
            log.info("user deleted while an event was handled; erasing again", extra={"fields": {"user": user_id}})
            await self._repo.erase_user(user_id, stone["anonymous_key"])


def milestone_event_id(user_id: str, days: int, reached: str) -> str:
    """The event id of a milestone: the same for every attempt to publish it."""
    return fact_id("analytics.streak_milestone", user_id, str(days), reached)

