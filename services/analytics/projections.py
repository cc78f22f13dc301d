"""Pure functions that turn events into read-model entries and figures, with no I/O.

Calendar rules, in one place:

* A session counts on the local calendar day, ISO week (Monday first) and month of its
  *completion* (``end_time``, or the envelope's ``occur_time`` when unset) in the IANA time zone
  it was done in; an unknown zone counts as UTC. Platform metrics use the UTC day instead.
* A streak is a maximal run of consecutive local days with at least one completed session. Its
  length is the number of days in the run. The *current* streak is the latest run when it ends
  today or yesterday in the user's latest time zone, else 0. A day with two sessions counts once.
* A milestone (3, 7, 14, 30, 50, 100, 365 days) belongs to the run it was reached in and is
  published once for that run: the record kept is the M-th day of the run, and a run that already
  holds a record for M (even after merging with another run) does not publish M again. Runs that
  were separate when they reached M each announce it, even if a session arriving late (out of
  order) joins them afterwards: an announcement is about the streak as it was known then.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2

from services.runtime.timeutil import from_timestamp

MILESTONES = (3, 7, 14, 30, 50, 100, 365)
#: Records of published milestones are kept for runs ending within this many days of the latest
#: one; older runs cannot become live again, so their records are no longer needed.
MILESTONE_RECORD_DAYS = 400

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def last_segment(name: str) -> str:
    """The id at the end of a resource name ("users/u/sessions/s" -> "s")."""
    return name.rsplit("/", 1)[-1]


def field_key(raw: str) -> str:
    """An id usable as a document field name: itself when safe, else a digest.

    Ids become keys of sub-documents (``sessions.<id>``), where a dot or a leading ``$`` would
    change the meaning of the update; ids from the contracts never have them, but events are input.
    """
    return raw if _SAFE_KEY.match(raw) else "h" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def zone(name: str) -> ZoneInfo:
    """The IANA zone called ``name``, or UTC when it is empty or unknown."""
    try:
        return ZoneInfo(name) if name else ZoneInfo("UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def monday_of(day: date) -> date:
    """The Monday of ``day``'s ISO week."""
    return day - timedelta(days=day.weekday())


def month_key(day: date) -> str:
    """"YYYY-MM" of ``day``."""
    return f"{day.year:04d}-{day.month:02d}"


def months_between(first: date, last: date) -> list[str]:
    """Every "YYYY-MM" from ``first``'s month to ``last``'s, inclusive."""
    keys: list[str] = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        keys.append(f"{year:04d}-{month:02d}")
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return keys


def local_midnight(day: date, tz_name: str) -> datetime:
    """The UTC instant at which ``day`` starts in ``tz_name``."""
    return datetime.combine(day, time(0), zone(tz_name)).astimezone(UTC)


@dataclass(frozen=True)
class LocalTime:
    """Where an instant falls in a time zone's calendar."""

    day: date
    week: date
    month: str

    @classmethod
    def of(cls, instant: datetime, tz_name: str) -> LocalTime:
        """Place ``instant`` in ``tz_name``'s calendar."""
        day = instant.astimezone(zone(tz_name)).date()
        return cls(day, monday_of(day), month_key(day))


def completion_time(payload: events_pb2.SessionCompleted, envelope: events_pb2.EventEnvelope) -> datetime:
    """When the session counts: its end time, or the event's when the producer left it unset."""
    if payload.HasField("end_time"):
        return from_timestamp(payload.end_time)
    return from_timestamp(envelope.occur_time)


def muscle_breakdown(exercises: Iterable[events_pb2.ExerciseSummary]) -> dict[str, dict[str, Any]]:
    """Volume and set count per primary muscle group, each set counting in full for every group."""
    groups: dict[str, dict[str, Any]] = {}
    for exercise in exercises:
        for group in dict.fromkeys(exercise.primary_muscle_groups):
            if group == fitness_pb2.MUSCLE_GROUP_UNSPECIFIED:
                continue
            slot = groups.setdefault(fitness_pb2.MuscleGroup.Name(group), {"volume": 0.0, "sets": 0})
            slot["volume"] += exercise.total_volume_kg
            slot["sets"] += exercise.set_count
    return groups


def session_entry(envelope: events_pb2.EventEnvelope) -> dict[str, Any]:
    """The figures of a SessionCompleted kept per session in the user's month document."""
    payload = envelope.session_completed
    end = completion_time(payload, envelope)
    start = from_timestamp(payload.start_time) if payload.HasField("start_time") else end
    local = LocalTime.of(end, payload.time_zone)
    return {
        "session": payload.session,
        "end": end,
        "tz": payload.time_zone or "UTC",
        "date": local.day.isoformat(),
        "week": local.week.isoformat(),
        "month": local.month,
        "seconds": max(0, int((end - start).total_seconds())),
        "volume": payload.total_volume_kg,
        "sets": payload.total_sets,
        "reps": sum(e.total_reps for e in payload.exercises),
        "muscles": muscle_breakdown(payload.exercises),
    }


def trend_entries(envelope: events_pb2.EventEnvelope) -> dict[str, dict[str, Any]]:
    """Per exercise id, the figures of one session kept in the exercise's trend document."""
    payload = envelope.session_completed
    end = completion_time(payload, envelope)
    local = LocalTime.of(end, payload.time_zone)
    entries: dict[str, dict[str, Any]] = {}
    for exercise in payload.exercises:
        exercise_id = last_segment(exercise.exercise)
        if not exercise_id:
            continue
        entry = entries.setdefault(
            exercise_id,
            {
                "end": end, "tz": payload.time_zone or "UTC", "date": local.day.isoformat(),
                "week": local.week.isoformat(), "month": local.month,
                "e1rm": 0.0, "weight": 0.0, "volume": 0.0, "sets": 0,
            },
        )
        # An exercise done in two blocks of one session is one summary per block: fold them.
        entry["e1rm"] = max(entry["e1rm"], exercise.estimated_one_rep_max_kg)
        entry["weight"] = max(entry["weight"], exercise.best_set_weight_kg)
        entry["volume"] += exercise.total_volume_kg
        entry["sets"] += exercise.set_count
    return entries


# --- streaks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A maximal run of consecutive active days, both ends inclusive."""

    start: date
    end: date

    @property
    def days(self) -> int:
        """The streak length."""
        return (self.end - self.start).days + 1

    def as_doc(self) -> dict[str, str]:
        """The stored form."""
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Run | None:
        """Read the stored form back (None stays None)."""
        if not doc:
            return None
        return cls(date.fromisoformat(doc["start"]), date.fromisoformat(doc["end"]))


def run_containing(active: set[date], day: date) -> Run:
    """The run of consecutive days of ``active`` that contains ``day`` (which must be in it)."""
    start = end = day
    while start - timedelta(days=1) in active:
        start -= timedelta(days=1)
    while end + timedelta(days=1) in active:
        end += timedelta(days=1)
    return Run(start, end)


def current_streak(latest: Run | None, today: date) -> int:
    """The current streak: the latest run's length if it ends today or yesterday, else 0."""
    if latest is None or latest.end < today - timedelta(days=1):
        return 0
    return latest.days


@dataclass(frozen=True)
class StreakUpdate:
    """The streak fields of the stats document after a session, and the milestones to publish."""

    latest: Run
    longest: Run
    records: list[dict[str, Any]]
    reached: list[tuple[int, date]]


def advance_streak(
    latest: Run | None,
    longest: Run | None,
    records: list[dict[str, Any]],
    run: Run,
    event_day: date,
) -> StreakUpdate:
    """Fold ``run`` (the run holding a newly active day) into the stored streak figures.

    ``event_day`` is the local day the event happened on: milestones are only announced for a run
    that was live then (ending that day or the day before), so that history arriving late, such as
    an import of old sessions, does not congratulate anyone on a streak from last year.
    """
    new_latest = run if latest is None or run.end >= latest.end else latest
    new_longest = run if longest is None or run.days > longest.days else longest
    kept = [r for r in records if date.fromisoformat(r["date"]) >= new_latest.end - timedelta(MILESTONE_RECORD_DAYS)]
    reached: list[tuple[int, date]] = []
    if run.end >= event_day - timedelta(days=1):
        for milestone in MILESTONES:
            if milestone > run.days:
                break
            done = any(
                r["days"] == milestone and run.start <= date.fromisoformat(r["date"]) <= run.end for r in kept
            )
            if not done:
                day = run.start + timedelta(days=milestone - 1)
                reached.append((milestone, day))
                kept.append({"days": milestone, "date": day.isoformat()})
    return StreakUpdate(new_latest, new_longest, kept, reached)


# --- aggregation over stored entries ------------------------------------------------------------


@dataclass
class Totals:
    """Sums over a set of session entries."""

    sessions: int = 0
    volume: float = 0.0
    sets: int = 0
    reps: int = 0
    seconds: int = 0

    def add(self, entry: Mapping[str, Any]) -> None:
        """Count one session entry."""
        self.sessions += 1
        self.volume += float(entry.get("volume", 0.0))
        self.sets += int(entry.get("sets", 0))
        self.reps += int(entry.get("reps", 0))
        self.seconds += int(entry.get("seconds", 0))


def add_muscles(into: dict[str, list[float]], entry: Mapping[str, Any]) -> None:
    """Add an entry's per-muscle [volume, sets] into ``into``."""
    for group, figures in entry.get("muscles", {}).items():
        slot = into.setdefault(group, [0.0, 0])
        slot[0] += float(figures["volume"])
        slot[1] += int(figures["sets"])


def ranked_muscles(volumes: Mapping[str, list[float]]) -> list[tuple[int, float, int]]:
    """(muscle group enum, volume, sets), largest volume first; groups without volume left out."""
    ranked = [
        (fitness_pb2.MuscleGroup.Value(group), figures[0], int(figures[1]))
        for group, figures in volumes.items()
        if figures[0] > 0 and group in fitness_pb2.MuscleGroup.keys()
    ]
    return sorted(ranked, key=lambda item: (-item[1], item[0]))


def change_percent(current: float, previous: float) -> float | None:
    """How much ``current`` differs from ``previous`` in percent of it; None when it was zero."""
    if previous == 0:
        return None
    return (current - previous) / previous * 100.0
