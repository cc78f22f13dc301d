"""The analytics service's RPCs: statistics, timeline, trends, reports and platform metrics.

Every read comes from documents the projector keeps up to date (``projector.py``): a stats
document, a handful of month documents, the records of a range. Nothing here calls another
service or scans a user's whole history, so reads stay cheap however busy the write path is.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any

import grpc
from fittracker.analytics.v1 import analytics_pb2, analytics_service_pb2, analytics_service_pb2_grpc

from services.analytics.projections import (
    Run,
    Totals,
    add_muscles,
    change_percent,
    current_streak,
    local_midnight,
    monday_of,
    month_key,
    months_between,
    ranked_muscles,
    zone,
)
from services.analytics.projector import Clock
from services.analytics.repository import AnalyticsRepository
from services.runtime import auth, paging
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.names import USER, Pattern
from services.runtime.storage import Document
from services.runtime.timeutil import from_timestamp, now, to_timestamp

SERVICE = "fittracker.analytics.v1.AnalyticsService"
#: Every method needs a token.
PUBLIC_METHODS: frozenset[str] = frozenset()

DEFAULT_PAGE_SIZE = 50
MAX_TREND_BUCKETS = 400
MAX_PERIOD = timedelta(days=366)
MAX_METRIC_DAYS = 366
#: Platform figures of a UTC day (or week) are stored once it ended this many days ago; the
#: projector re-opens days it writes to from one day after, so the two never race on a day.
SEAL_AFTER_DAYS = 2
#: Month documents are keyed by local month; a UTC instant is at most 14 hours from local time.
ZONE_SLACK = timedelta(days=1)

Context = grpc.aio.ServicerContext[Any, Any]
STATS = Pattern("users/{user}/stats")
PERIOD_REPORT = Pattern("users/{user}/periodReport")
EXERCISE_TREND = Pattern("users/{user}/exerciseTrends/{exercise}")


class AnalyticsService(analytics_service_pb2_grpc.AnalyticsServiceServicer):
    """Implements fittracker.analytics.v1.AnalyticsService."""

    def __init__(self, repo: AnalyticsRepository, pages: paging.PageTokens, clock: Clock = now) -> None:
        """Read from ``repo``; ``clock`` gives "now" (today, this week, sealing)."""
        self._repo = repo
        self._pages = pages
        self._clock = clock

    # --- helpers ----------------------------------------------------------------------------

    async def _owned(self, user_segment: str) -> tuple[str, Document]:
        """Resolve "me", check the caller may read the user, and return the user's stats document.

        A member reading someone else gets NOT_FOUND (``require_owner``). A user with no data yet
        gets an empty document; an admin asking about a user analytics has never heard of (no
        registration, session or record event) gets NOT_FOUND.
        """
        user_id = auth.resolve_user_id(user_segment)
        principal = auth.require_owner(user_id)
        stats = await self._repo.stats.get(user_id)
        if stats is None:
            if principal.user_id != user_id:
                raise NotFound(f"users/{user_id} not found")
            return user_id, {}
        return user_id, stats

    # --- GetUserStats -----------------------------------------------------------------------

    async def GetUserStats(  # noqa: N802 - gRPC method names are the contract's
        self, request: analytics_service_pb2.GetUserStatsRequest, context: Context
    ) -> analytics_pb2.UserStats:
        """The stats document, plus this week's and month's sessions from one or two month documents."""
        user_id, stats = await self._owned(STATS.parse(request.name)["user"])
        today = self._clock().astimezone(zone(stats.get("time_zone", "UTC"))).date()
        week, month = monday_of(today), month_key(today)
        docs = await self._repo.month_docs(user_id, month_key(week), month) if stats else []
        week_totals, month_totals = Totals(), Totals()
        week_muscles: dict[str, list[float]] = {}
        month_muscles: dict[str, list[float]] = {}
        for entry in _entries(docs):
            if entry["week"] == week.isoformat():
                week_totals.add(entry)
                add_muscles(week_muscles, entry)
            if entry["month"] == month:
                month_totals.add(entry)
                add_muscles(month_muscles, entry)
        subtotals = stats.get("months", {}).values()
        longest = Run.from_doc(stats.get("longest_run"))
        reply = analytics_pb2.UserStats(
            name=f"users/{user_id}/stats",
            total_sessions=sum(int(m["sessions"]) for m in subtotals),
            total_volume_kg=sum(float(m["volume"]) for m in subtotals),
            current_streak_days=current_streak(Run.from_doc(stats.get("latest_run")), today),
            longest_streak_days=longest.days if longest else 0,
            sessions_this_week=week_totals.sessions,
            sessions_this_month=month_totals.sessions,
            week_muscle_group_volumes=_volumes(week_muscles),
            month_muscle_group_volumes=_volumes(month_muscles),
            total_personal_records=await self._repo.records.count({"user_id": user_id}) if stats else 0,
            last_session_time=to_timestamp(stats.get("last_session_time")),
            update_time=to_timestamp(stats.get("update_time")),
        )
        return reply

    # --- ListPersonalRecordTimeline -----------------------------------------------------------

    async def ListPersonalRecordTimeline(  # noqa: N802
        self, request: analytics_service_pb2.ListPersonalRecordTimelineRequest, context: Context
    ) -> analytics_service_pb2.ListPersonalRecordTimelineResponse:
        """Records newest first, paged with a token that carries the last (time, id) and the filters."""
        start = from_timestamp(request.start_time, "start_time") if request.HasField("start_time") else None
        end = from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        user_id, _ = await self._owned(USER.parse(request.parent, "parent")["user"])
        exercise = request.exercise.removeprefix("exercises/")
        query = paging.fingerprint("record-timeline", user_id, exercise, start, end)
        position = self._pages.decode(request.page_token, query)
        after = (datetime.fromisoformat(position[0]), str(position[1])) if position else None
        size = request.page_size or DEFAULT_PAGE_SIZE
        docs = await self._repo.record_timeline(user_id, exercise, start, end, after, size + 1)
        page = docs[:size]
        token = ""
        if len(docs) > size:
            token = self._pages.encode(query, [page[-1]["achieve_time"].isoformat(), page[-1]["_id"]])
        return analytics_service_pb2.ListPersonalRecordTimelineResponse(
            personal_records=[_record(d) for d in page], next_page_token=token
        )

    # --- GetExerciseTrend ---------------------------------------------------------------------

    async def GetExerciseTrend(  # noqa: N802
        self, request: analytics_service_pb2.GetExerciseTrendRequest, context: Context
    ) -> analytics_pb2.ExerciseTrend:
        """Trend points grouped from the exercise's month documents that overlap the range."""
        trend = EXERCISE_TREND.parse(request.name)
        segment, exercise_id = trend["user"], trend["exercise"]
        start = from_timestamp(request.start_time, "start_time")
        end = from_timestamp(request.end_time, "end_time") if request.HasField("end_time") else self._clock()
        if end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        granularity = request.granularity or analytics_pb2.GRANULARITY_WEEK
        buckets = _bucket_count(start, end, granularity)
        if buckets > MAX_TREND_BUCKETS:
            raise InvalidArgument.field(
                "end_time", f"the range holds {buckets} buckets of this granularity; at most {MAX_TREND_BUCKETS}"
            )
        user_id, _ = await self._owned(segment)
        if not await self._repo.exercise_known(exercise_id):
            raise NotFound(f"exercises/{exercise_id} not found")
        docs = await self._repo.trend_docs(
            user_id, exercise_id, month_key((start - ZONE_SLACK).date()), month_key((end + ZONE_SLACK).date())
        )
        groups: dict[str, list[Document]] = {}
        for entry in _entries(docs):
            if start <= entry["end"] < end:
                groups.setdefault(_bucket_key(entry, granularity), []).append(entry)
        points = []
        for key in sorted(groups):
            entries = sorted(groups[key], key=lambda e: e["end"])
            points.append(
                analytics_pb2.TrendPoint(
                    # A bucket starts at its first day's midnight where its first session was done.
                    bucket_start_time=to_timestamp(local_midnight(date.fromisoformat(key), entries[0]["tz"])),
                    estimated_one_rep_max_kg=max(float(e["e1rm"]) for e in entries),
                    max_weight_kg=max(float(e["weight"]) for e in entries),
                    volume_kg=sum(float(e["volume"]) for e in entries),
                    set_count=sum(int(e["sets"]) for e in entries),
                    session_count=len(entries),
                )
            )
        return analytics_pb2.ExerciseTrend(
            name=f"users/{user_id}/exerciseTrends/{exercise_id}",
            exercise=f"exercises/{exercise_id}",
            granularity=granularity,
            start_time=to_timestamp(start),
            end_time=to_timestamp(end),
            points=points,
        )

    # --- GetPeriodReport ------------------------------------------------------------------------

    async def GetPeriodReport(  # noqa: N802
        self, request: analytics_service_pb2.GetPeriodReportRequest, context: Context
    ) -> analytics_pb2.PeriodReport:
        """Sums over the month documents of both periods and the records of this one."""
        start, end = from_timestamp(request.start_time, "start_time"), from_timestamp(request.end_time, "end_time")
        if end <= start:
            raise InvalidArgument.field("end_time", "must be after start_time")
        if end - start > MAX_PERIOD:
            raise InvalidArgument.field("end_time", "the period must not be longer than 366 days")
        previous_start = start - (end - start)
        user_id, stats = await self._owned(PERIOD_REPORT.parse(request.name)["user"])
        docs = (
            await self._repo.month_docs(
                user_id, month_key((previous_start - ZONE_SLACK).date()), month_key((end + ZONE_SLACK).date())
            )
            if stats else []
        )
        current, previous = Totals(), Totals()
        muscles: dict[str, list[float]] = {}
        for entry in _entries(docs):
            if start <= entry["end"] < end:
                current.add(entry)
                add_muscles(muscles, entry)
            elif previous_start <= entry["end"] < start:
                previous.add(entry)
        records = await self._repo.records_between(user_id, start, end)
        previous_records = await self._repo.count_records_between(user_id, previous_start, start)
        comparison = analytics_pb2.PeriodComparison()
        for field, now_value, before in (
            ("session_count_change_percent", current.sessions, previous.sessions),
            ("volume_change_percent", current.volume, previous.volume),
            ("set_count_change_percent", current.sets, previous.sets),
            ("training_time_change_percent", current.seconds, previous.seconds),
        ):
            change = change_percent(now_value, before)
            if change is not None:
                setattr(comparison, field, change)
        return analytics_pb2.PeriodReport(
            name=f"users/{user_id}/periodReport",
            start_time=to_timestamp(start),
            end_time=to_timestamp(end),
            totals=_totals(current, len(records)),
            muscle_group_volumes=_volumes(muscles),
            personal_records=[_record(r) for r in records],
            previous_totals=_totals(previous, previous_records),
            comparison=comparison,
        )

    # --- GetPlatformMetrics -------------------------------------------------------------------

    async def GetPlatformMetrics(  # noqa: N802
        self, request: analytics_service_pb2.GetPlatformMetricsRequest, context: Context
    ) -> analytics_pb2.PlatformMetrics:
        """Daily and weekly figures: sealed rollups where valid, else counted from activity markers."""
        auth.require_admin()
        first = _parse_date(request.start_date, "start_date")
        last = _parse_date(request.end_date, "end_date")
        if last < first:
            raise InvalidArgument.field("end_date", "must not be before start_date")
        if (last - first).days + 1 > MAX_METRIC_DAYS:
            raise InvalidArgument.field("end_date", f"the range must not be longer than {MAX_METRIC_DAYS} days")
        days = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        mondays = sorted({monday_of(d) for d in days})
        full_weeks = [m for m in mondays if m >= first and m + timedelta(days=6) <= last]
        sealable = self._clock().astimezone(UTC).date() - timedelta(days=SEAL_AFTER_DAYS)
        rollups = await self._repo.rollup_docs(
            [f"day:{d.isoformat()}" for d in days] + [f"week:{m.isoformat()}" for m in full_weeks]
        )
        need = {d for d in days if _sealed(rollups.get(f"day:{d.isoformat()}")) is None}
        need |= {
            d for d in days
            if monday_of(d) not in full_weeks or _sealed(rollups.get(f"week:{monday_of(d).isoformat()}")) is None
        }
        markers = await self._repo.markers_on(d.isoformat() for d in need)
        by_day: dict[str, list[Document]] = {}
        for marker in markers:
            by_day.setdefault(marker["date"], []).append(marker)

        reply = analytics_pb2.PlatformMetrics(start_date=first.isoformat(), end_date=last.isoformat())
        for day in days:
            key = f"day:{day.isoformat()}"
            counts = _sealed(rollups.get(key))
            if counts is None:
                counts = _day_counts(by_day.get(day.isoformat(), []))
                if day < sealable:
                    await self._repo.seal_rollup(key, int(rollups.get(key, {}).get("v", 0)), counts)
            reply.days.append(
                analytics_pb2.DailyMetrics(
                    date=day.isoformat(), active_users=counts["active_users"],
                    sessions_completed=counts["sessions_completed"], new_users=counts["new_users"],
                )
            )
        for monday in mondays:
            key = f"week:{monday.isoformat()}"
            counts = _sealed(rollups.get(key)) if monday in full_weeks else None
            if counts is None:
                inside = [monday + timedelta(days=i) for i in range(7) if first <= monday + timedelta(days=i) <= last]
                counts = _week_counts(m for d in inside for m in by_day.get(d.isoformat(), []))
                if monday in full_weeks and monday + timedelta(days=6) < sealable:
                    await self._repo.seal_rollup(key, int(rollups.get(key, {}).get("v", 0)), counts)
            reply.weeks.append(
                analytics_pb2.WeeklyMetrics(
                    week_start_date=monday.isoformat(), active_users=counts["active_users"],
                    sessions_completed=counts["sessions_completed"],
                )
            )
        return reply


# --- module helpers ---------------------------------------------------------------------------


def _entries(docs: Iterable[Document]) -> Iterable[Document]:
    """The session entries of month (or trend) documents."""
    for doc in docs:
        yield from doc.get("sessions", {}).values()


def _volumes(muscles: dict[str, list[float]]) -> list[analytics_pb2.MuscleGroupVolume]:
    return [
        analytics_pb2.MuscleGroupVolume(muscle_group=group, volume_kg=volume, set_count=sets)  # type: ignore[arg-type]
        for group, volume, sets in ranked_muscles(muscles)
    ]


def _totals(totals: Totals, records: int) -> analytics_pb2.PeriodTotals:
    return analytics_pb2.PeriodTotals(
        session_count=totals.sessions, volume_kg=totals.volume, set_count=totals.sets,
        rep_count=totals.reps, training_seconds=totals.seconds, personal_record_count=records,
    )


def _record(doc: Document) -> analytics_pb2.PersonalRecordEvent:
    record = analytics_pb2.PersonalRecordEvent(
        exercise=f"exercises/{doc['exercise']}",
        kind=doc["kind"],
        value=doc["value"],
        weight_kg=doc["weight_kg"],
        reps=doc["reps"],
        session=doc["session"],
        achieve_time=to_timestamp(doc["achieve_time"]),
    )
    if doc.get("previous_value") is not None:
        record.previous_value = doc["previous_value"]
    return record


def _bucket_key(entry: Document, granularity: int) -> str:
    """The first local day of the entry's bucket, "YYYY-MM-DD"."""
    if granularity == analytics_pb2.GRANULARITY_DAY:
        return str(entry["date"])
    if granularity == analytics_pb2.GRANULARITY_MONTH:
        return f"{entry['month']}-01"
    return str(entry["week"])


def _bucket_count(start: datetime, end: datetime, granularity: int) -> int:
    """How many UTC calendar buckets [start, end) touches."""
    first, last = start.date(), (end - timedelta(microseconds=1)).date()
    if granularity == analytics_pb2.GRANULARITY_DAY:
        return (last - first).days + 1
    if granularity == analytics_pb2.GRANULARITY_MONTH:
        return len(months_between(first, last))
    return (monday_of(last) - monday_of(first)).days // 7 + 1


def _parse_date(text: str, field: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidArgument.field(field, "must be a calendar date, YYYY-MM-DD") from None


def _sealed(rollup: Document | None) -> dict[str, int] | None:
    """The stored figures of a rollup, or None when there are none or a late event re-opened them."""
    if rollup is None or "counts" not in rollup or rollup.get("counts_v") != rollup.get("v", 0):
        return None
    return {k: int(v) for k, v in rollup["counts"].items()}


def _day_counts(markers: Iterable[Document]) -> dict[str, int]:
    active = sessions = new = 0
    for marker in markers:
        done = len(marker.get("sessions", {}))
        active += done > 0
        sessions += done
        new += bool(marker.get("registered"))
    return {"active_users": active, "sessions_completed": sessions, "new_users": new}


def _week_counts(markers: Iterable[Document]) -> dict[str, int]:
    users: set[str] = set()
    sessions = 0
    for marker in markers:
        done = len(marker.get("sessions", {}))
        if done:
            users.add(marker["user_key"])
            sessions += done
    return {"active_users": len(users), "sessions_completed": sessions}





