"""The analytics service through a real channel: figures from real events, ownership, erasure, the bus."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import grpc
import pytest
from fittracker.analytics.v1 import analytics_pb2, analytics_service_pb2
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.events.v1 import events_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.analytics.projector import Projector, milestone_event_id
from services.runtime.events import Outbox, fact_id, stream_of
from tests.analytics.conftest import (
    NOW,
    AnalyticsApi,
    Lift,
    new_user,
    record_achieved,
    session_completed,
    user_deleted,
    user_registered,
)

LA = ZoneInfo("America/Los_Angeles")
TOKYO = ZoneInfo("Asia/Tokyo")
BERLIN = ZoneInfo("Europe/Berlin")


def local(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A wall-clock time in ``tz`` as a UTC instant."""
    return datetime(year, month, day, hour, minute, tzinfo=tz).astimezone(UTC)


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    """A UTC time."""
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def ts(value: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def volumes(items: object) -> list[tuple[str, float, int]]:
    return [
        (fit.MuscleGroup.Name(v.muscle_group), v.volume_kg, v.set_count)
        for v in items  # type: ignore[attr-defined]
    ]


def violations(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


async def stats_of(api: AnalyticsApi, user_id: str, *, as_user: str | None = None) -> analytics_pb2.UserStats:
    return await api.stub.GetUserStats(
        analytics_service_pb2.GetUserStatsRequest(name="users/me/stats"), metadata=api.token(as_user or user_id)
    )


Figures = tuple[list[tuple[str, int, int, int]], list[tuple[str, int, int]]]

BENCH = ("bench-press", [fit.MUSCLE_GROUP_CHEST, fit.MUSCLE_GROUP_TRICEPS])
SQUAT = ("barbell-back-squat", [fit.MUSCLE_GROUP_QUADRICEPS, fit.MUSCLE_GROUP_GLUTES])
DEADLIFT = (
    "deadlift",
    # Listed twice on purpose: a group counts once per set however the catalog lists it.
    [fit.MUSCLE_GROUP_HAMSTRINGS, fit.MUSCLE_GROUP_GLUTES, fit.MUSCLE_GROUP_LOWER_BACK, fit.MUSCLE_GROUP_GLUTES],
)
ROW = ("barbell-row", [fit.MUSCLE_GROUP_LATS])


async def test_weekly_and_monthly_volume_per_muscle_in_the_sessions_time_zone(api: AnalyticsApi) -> None:
    user = new_user()
    tz = "America/Los_Angeles"
    events = [
        session_completed(user, "s0", local(LA, 2025, 2, 28, 10), tz, [Lift(*ROW, 3, 30, 1500)]),
        # Sunday 23:30 in Los Angeles is already Monday in UTC: it belongs to last week here.
        session_completed(user, "s1", local(LA, 2025, 3, 9, 23, 30), tz, [Lift(*SQUAT, 5, 25, 3000)]),
        session_completed(user, "s2", local(LA, 2025, 3, 10, 18), tz, [Lift(*BENCH, 4, 32, 2400)]),
        session_completed(user, "s3", local(LA, 2025, 3, 11, 7), tz, [Lift(*DEADLIFT, 3, 15, 2000)]),
    ]
    await api.feed(*events)
    stats = await stats_of(api, user)
    assert stats.name == f"users/{user}/stats"
    assert (stats.total_sessions, stats.total_volume_kg) == (4, 8900.0)
    assert (stats.sessions_this_week, stats.sessions_this_month) == (2, 3)
    assert volumes(stats.week_muscle_group_volumes) == [
        ("MUSCLE_GROUP_CHEST", 2400.0, 4),
        ("MUSCLE_GROUP_TRICEPS", 2400.0, 4),
        ("MUSCLE_GROUP_LOWER_BACK", 2000.0, 3),
        ("MUSCLE_GROUP_GLUTES", 2000.0, 3),
        ("MUSCLE_GROUP_HAMSTRINGS", 2000.0, 3),
    ]
    assert volumes(stats.month_muscle_group_volumes) == [
        ("MUSCLE_GROUP_GLUTES", 5000.0, 8),
        ("MUSCLE_GROUP_QUADRICEPS", 3000.0, 5),
        ("MUSCLE_GROUP_CHEST", 2400.0, 4),
        ("MUSCLE_GROUP_TRICEPS", 2400.0, 4),
        ("MUSCLE_GROUP_LOWER_BACK", 2000.0, 3),
        ("MUSCLE_GROUP_HAMSTRINGS", 2000.0, 3),
    ]
    # Sunday, Monday and Tuesday in Los Angeles; "today" is Wednesday there.
    assert (stats.current_streak_days, stats.longest_streak_days) == (3, 3)
    assert stats.last_session_time.ToDatetime(tzinfo=UTC) == local(LA, 2025, 3, 11, 7)
    assert stats.HasField("update_time")

    milestones = await api.published("StreakMilestoneReached", user)
    assert [(m.streak_milestone_reached.streak_days, m.streak_milestone_reached.session) for m in milestones] == [
        (3, f"users/{user}/sessions/s3")
    ]
    assert milestones[0].event_id == milestone_event_id(user, 3, "2025-03-11")
    assert milestones[0].producer == "analytics"
    stored = await api.repo.stats.get(user)
    assert stored is not None and stored.get("pending_milestones") == []

    # Every event delivered again, in another order: nothing changes and nothing is published again.
    await api.feed(*reversed(events))
    again = await stats_of(api, user)
    again.ClearField("update_time")
    stats.ClearField("update_time")
    assert again == stats
    assert len(await api.published("StreakMilestoneReached", user)) == 1


async def test_streaks_count_local_days_and_survive_out_of_order_delivery(api: AnalyticsApi) -> None:
    user = new_user()
    tz = "Asia/Tokyo"
    lift = [Lift(*BENCH, 3, 24, 1200)]
    at = {
        # Local days 6, 7, 8 March are consecutive; their UTC days (5, 7, 7, 8) are not.
        "a": local(TOKYO, 2025, 3, 6, 0, 30),
        "b": local(TOKYO, 2025, 3, 7, 23, 30),
        "c": local(TOKYO, 2025, 3, 8, 8),
        "c2": local(TOKYO, 2025, 3, 8, 19),  # a second session on one day counts once
        "d": local(TOKYO, 2025, 3, 11, 12),
        "e": local(TOKYO, 2025, 3, 12, 12),
    }
    for key in ("c", "a", "e", "b", "c2", "d"):
        await api.feed(session_completed(user, key, at[key], tz, lift))
    stats = await stats_of(api, user)
    # "Today" is Thursday 13 March in Tokyo: the run of 11-12 March is current.
    assert (stats.current_streak_days, stats.longest_streak_days) == (2, 3)
    assert (stats.total_sessions, stats.sessions_this_week) == (6, 2)
    milestones = await api.published("StreakMilestoneReached", user)
    assert [m.streak_milestone_reached.streak_days for m in milestones] == [3]
    # The event that joined 6 and 8 March into one run is the one that reached three days.
    assert milestones[0].streak_milestone_reached.session == f"users/{user}/sessions/b"

    # A year-old run reported now (an import) is history: it counts, but is not announced.
    old = new_user()
    for day in (1, 2, 3, 4):
        envelope = session_completed(old, f"old{day}", datetime(2024, 1, day, 12, tzinfo=UTC), "UTC", lift)
        envelope.occur_time.FromDatetime(datetime(2025, 3, 12, 12, tzinfo=UTC))
        await api.feed(envelope)
    old_stats = await stats_of(api, old)
    assert (old_stats.current_streak_days, old_stats.longest_streak_days) == (0, 4)
    assert await api.published("StreakMilestoneReached", old) == []


async def test_redelivered_and_republished_sessions_never_double_count(api: AnalyticsApi) -> None:
    user = new_user()
    end = datetime(2025, 3, 12, 9, tzinfo=UTC)
    first = session_completed(user, "once", end, "UTC", [Lift(*SQUAT, 5, 25, 2500, 100, 5, 116.5)])
    # The same session under a new event id (a producer that lost its outbox entry and retried).
    again = session_completed(
        user, "once", end, "UTC", [Lift(*SQUAT, 5, 25, 2500, 100, 5, 116.5)], event_id=str(uuid.uuid4())
    )
    record = record_achieved(user, "pr1", "once", "barbell-back-squat", 116.5, end)
    await api.feed(first, first, again, record, record)
    stats = await stats_of(api, user)
    assert (stats.total_sessions, stats.total_volume_kg, stats.total_personal_records) == (1, 2500.0, 1)
    assert volumes(stats.week_muscle_group_volumes) == [
        ("MUSCLE_GROUP_GLUTES", 2500.0, 5), ("MUSCLE_GROUP_QUADRICEPS", 2500.0, 5)
    ]
    trend = await api.stub.GetExerciseTrend(
        analytics_service_pb2.GetExerciseTrendRequest(
            name="users/me/exerciseTrends/barbell-back-squat", start_time=ts(end - timedelta(days=1)),
            granularity=analytics_pb2.GRANULARITY_DAY,
        ),
        metadata=api.token(user),
    )
    assert [(p.session_count, p.volume_kg, p.set_count) for p in trend.points] == [(1, 2500.0, 5)]


async def test_concurrent_sessions_of_one_user_all_count(api: AnalyticsApi) -> None:
    user = new_user()
    days = range(2, 12)
    events = [
        session_completed(user, f"c{d}", datetime(2025, 3, d, 12, tzinfo=UTC), "UTC", [Lift(*ROW, 2, 20, 100)])
        for d in days
    ]
    # Ten replicas' worth of handlers racing on one stats document: compare-and-set keeps them all.
    await asyncio.gather(*(api.projector.handle(e) for e in events))
    stats = await stats_of(api, user)
    assert (stats.total_sessions, stats.total_volume_kg, stats.longest_streak_days) == (10, 1000.0, 10)
    assert stats.current_streak_days == 10  # 2-11 March, and "today" is 12 March
    milestones = [m.streak_milestone_reached.streak_days for m in await api.published("StreakMilestoneReached", user)]
    # Handled in any order, days 2-4 and 7-9 may each have been a three-day streak of their own
    # before the days between them arrived, so 3 may be announced twice; 7 needs the whole run.
    assert set(milestones) == {3, 7} and milestones.count(7) == 1 and len(milestones) <= 3


class FailingOnce(Outbox):
    """The real outbox, failing its first add: a crash after the stats were written."""

    failed = False

    async def add(self, envelope: events_pb2.EventEnvelope) -> bool:
        if not self.failed:
            self.failed = True
            raise ConnectionError("the store went away")
        return await super().add(envelope)


async def test_a_milestone_recorded_before_a_crash_is_published_on_redelivery(api: AnalyticsApi) -> None:
    store = api.running.resources.store
    projector = Projector(api.repo, FailingOnce(store, api.running.resources.events), clock=lambda: NOW)
    user = new_user()
    events = [
        session_completed(user, f"k{d}", at(2025, 3, d, 7), "UTC", [Lift(*ROW, 1, 10, 50)]) for d in (9, 10, 11)
    ]
    await projector.handle(events[0])
    await projector.handle(events[1])
    with pytest.raises(ConnectionError):
        await projector.handle(events[2])
    assert await api.published("StreakMilestoneReached", user) == []
    await projector.handle(events[2])  # the bus delivers the failed event again
    await projector.handle(events[2])
    milestones = await api.published("StreakMilestoneReached", user)
    assert [m.streak_milestone_reached.streak_days for m in milestones] == [3]
    assert (await stats_of(api, user)).total_sessions == 3


async def test_period_report_compares_with_the_previous_period(api: AnalyticsApi) -> None:
    user = new_user()
    bench, squat, deadlift = Lift(*BENCH, 5, 40, 1000), Lift(*SQUAT, 5, 25, 1000), Lift(*DEADLIFT, 5, 25, 1500)
    await api.feed(
        session_completed(user, "p1", at(2025, 1, 26, 10), "UTC", [bench]),
        session_completed(user, "p2", at(2025, 1, 30, 10), "UTC", [bench]),
        session_completed(user, "c1", at(2025, 2, 2, 10), "UTC", [bench]),
        session_completed(user, "c2", at(2025, 2, 4, 10), "UTC", [squat], minutes=45),
        session_completed(user, "c3", at(2025, 2, 7, 23, 59), "UTC", [deadlift], minutes=45),
        session_completed(user, "next", at(2025, 2, 8), "UTC", [bench], minutes=30),  # end is exclusive
        record_achieved(user, "r1", "p2", "bench-press", 100, at(2025, 1, 30, 10)),
        record_achieved(user, "r2", "c2", "barbell-back-squat", 110, at(2025, 2, 4, 10), previous=100,
                        weight=100, reps=3),
        record_achieved(user, "r3", "c3", "deadlift", 1500, at(2025, 2, 7, 23, 59),
                        kind=fit.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME),
    )
    report = await api.stub.GetPeriodReport(
        analytics_service_pb2.GetPeriodReportRequest(
            name="users/me/periodReport", start_time=ts(at(2025, 2, 1)), end_time=ts(at(2025, 2, 8))
        ),
        metadata=api.token(user),
    )
    assert report.name == f"users/{user}/periodReport"
    assert report.totals == analytics_pb2.PeriodTotals(
        session_count=3, volume_kg=3500, set_count=15, rep_count=90, training_seconds=9000, personal_record_count=2
    )
    assert report.previous_totals == analytics_pb2.PeriodTotals(
        session_count=2, volume_kg=2000, set_count=10, rep_count=80, training_seconds=7200, personal_record_count=1
    )
    assert report.comparison == analytics_pb2.PeriodComparison(
        session_count_change_percent=50.0, volume_change_percent=75.0,
        set_count_change_percent=50.0, training_time_change_percent=25.0,
    )
    assert volumes(report.muscle_group_volumes) == [
        ("MUSCLE_GROUP_GLUTES", 2500.0, 10), ("MUSCLE_GROUP_LOWER_BACK", 1500.0, 5),
        ("MUSCLE_GROUP_HAMSTRINGS", 1500.0, 5), ("MUSCLE_GROUP_CHEST", 1000.0, 5),
        ("MUSCLE_GROUP_TRICEPS", 1000.0, 5), ("MUSCLE_GROUP_QUADRICEPS", 1000.0, 5),
    ]
    assert [(r.exercise, r.value, r.HasField("previous_value")) for r in report.personal_records] == [
        ("exercises/barbell-back-squat", 110.0, True), ("exercises/deadlift", 1500.0, False)
    ]
    first = report.personal_records[0]
    assert (first.previous_value, first.weight_kg, first.reps, first.session) == (
        100.0, 100.0, 3, f"users/{user}/sessions/c2"
    )
    assert first.kind == fit.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX

    async def report_of(start: datetime, end: datetime) -> analytics_pb2.PeriodReport:
        return await api.stub.GetPeriodReport(
            analytics_service_pb2.GetPeriodReportRequest(
                name=f"users/{user}/periodReport", start_time=ts(start), end_time=ts(end)
            ),
            metadata=api.token(user),
        )

    # 27 January had nothing, the day before it one session: down by all of it.
    dropped = await report_of(at(2025, 1, 27), at(2025, 1, 28))
    assert (dropped.totals.session_count, dropped.previous_totals.session_count) == (0, 1)
    assert dropped.comparison.session_count_change_percent == -100.0
    first_ever = await report_of(at(2025, 1, 26), at(2025, 1, 27))
    assert first_ever.totals.session_count == 1
    assert first_ever.comparison == analytics_pb2.PeriodComparison()  # nothing before: no percentages

    for start, end, field in (
        (at(2025, 2, 8), at(2025, 2, 1), "end_time"),
        (at(2024, 1, 1), at(2025, 2, 1), "end_time"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.stub.GetPeriodReport(
                analytics_service_pb2.GetPeriodReportRequest(
                    name="users/me/periodReport", start_time=ts(start), end_time=ts(end)
                ),
                metadata=api.token(user),
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == [field]


async def test_exercise_trend_points_per_day_week_and_month(api: AnalyticsApi) -> None:
    user = new_user()
    tz = "Europe/Berlin"
    squat = SQUAT
    await api.feed(
        session_completed(user, "t1", local(BERLIN, 2025, 1, 6, 18), tz,
                          [Lift(*squat, 5, 25, 2500, 100, 5, 120), Lift(*BENCH, 3, 30, 999, 80, 10, 106)]),
        session_completed(user, "t2", local(BERLIN, 2025, 1, 8, 18), tz, [Lift(*squat, 5, 25, 2700, 105, 5, 122.5)]),
        # 00:30 on Monday in Berlin is still Sunday in UTC: it opens the second week here.
        session_completed(user, "t4", local(BERLIN, 2025, 1, 13, 0, 30), tz, [Lift(*squat, 2, 10, 1000, 80, 5, 90)]),
        session_completed(user, "t3", local(BERLIN, 2025, 1, 14, 18), tz, [Lift(*squat, 4, 20, 2800, 107.5, 5, 125)]),
    )

    async def trend(granularity: int, start: datetime, end: datetime) -> analytics_pb2.ExerciseTrend:
        return await api.stub.GetExerciseTrend(
            analytics_service_pb2.GetExerciseTrendRequest(
                name="users/me/exerciseTrends/barbell-back-squat", start_time=ts(start), end_time=ts(end),
                granularity=granularity,  # type: ignore[arg-type]
            ),
            metadata=api.token(user),
        )

    def points(reply: analytics_pb2.ExerciseTrend) -> list[tuple[datetime, float, float, float, int, int]]:
        return [
            (p.bucket_start_time.ToDatetime(tzinfo=UTC), p.estimated_one_rep_max_kg, p.max_weight_kg, p.volume_kg,
             p.set_count, p.session_count)
            for p in reply.points
        ]

    january = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC))
    weekly = await trend(analytics_pb2.GRANULARITY_UNSPECIFIED, *january)
    assert (weekly.name, weekly.exercise) == (f"users/{user}/exerciseTrends/barbell-back-squat",
                                              "exercises/barbell-back-squat")
    assert weekly.granularity == analytics_pb2.GRANULARITY_WEEK
    assert points(weekly) == [
        (local(BERLIN, 2025, 1, 6), 122.5, 105.0, 5200.0, 10, 2),
        (local(BERLIN, 2025, 1, 13), 125.0, 107.5, 3800.0, 6, 2),
    ]
    daily = await trend(analytics_pb2.GRANULARITY_DAY, *january)
    assert [(p[0], p[1]) for p in points(daily)] == [
        (local(BERLIN, 2025, 1, 6), 120.0), (local(BERLIN, 2025, 1, 8), 122.5),
        (local(BERLIN, 2025, 1, 13), 90.0), (local(BERLIN, 2025, 1, 14), 125.0),
    ]
    monthly = await trend(analytics_pb2.GRANULARITY_MONTH, *january)
    assert points(monthly) == [(local(BERLIN, 2025, 1, 1), 125.0, 107.5, 9000.0, 16, 4)]
    narrow = await trend(analytics_pb2.GRANULARITY_WEEK, datetime(2025, 1, 7, tzinfo=UTC),
                         datetime(2025, 1, 14, tzinfo=UTC))
    assert [(p[1], p[5]) for p in points(narrow)] == [(122.5, 1), (90.0, 1)]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetExerciseTrend(
            analytics_service_pb2.GetExerciseTrendRequest(
                name="users/me/exerciseTrends/no-such-exercise", start_time=ts(january[0])
            ),
            metadata=api.token(user),
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for granularity, start, end in (
        (analytics_pb2.GRANULARITY_DAY, datetime(2023, 1, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        (analytics_pb2.GRANULARITY_WEEK, january[1], january[0]),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await trend(granularity, start, end)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == ["end_time"]


async def test_personal_record_timeline_pages_newest_first(api: AnalyticsApi) -> None:
    user = new_user()
    base = datetime(2025, 2, 1, 12, tzinfo=UTC)
    records = [
        record_achieved(user, f"r{i}", f"s{i}", "bench-press" if i % 2 else "deadlift", 100 + i,
                        base + timedelta(days=i))
        for i in range(5)
    ]
    await api.feed(*records, records[2])
    seen: list[float] = []
    token = ""
    for _ in range(5):
        page = await api.stub.ListPersonalRecordTimeline(
            analytics_service_pb2.ListPersonalRecordTimelineRequest(parent="users/me", page_size=2, page_token=token),
            metadata=api.token(user),
        )
        seen += [r.value for r in page.personal_records]
        token = page.next_page_token
        if not token:
            break
    assert seen == [104, 103, 102, 101, 100]
    filtered = await api.stub.ListPersonalRecordTimeline(
        analytics_service_pb2.ListPersonalRecordTimelineRequest(
            parent=f"users/{user}", exercise="exercises/deadlift", start_time=ts(base + timedelta(days=1)),
        ),
        metadata=api.token(user),
    )
    assert [r.value for r in filtered.personal_records] == [104, 102]
    assert (await stats_of(api, user)).total_personal_records == 5

    first = await api.stub.ListPersonalRecordTimeline(
        analytics_service_pb2.ListPersonalRecordTimelineRequest(parent="users/me", page_size=1),
        metadata=api.token(user),
    )
    for request in (
        analytics_service_pb2.ListPersonalRecordTimelineRequest(
            parent="users/me", page_token=first.next_page_token, exercise="exercises/deadlift"
        ),
        analytics_service_pb2.ListPersonalRecordTimelineRequest(parent="users/me", page_token="garbage!"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.stub.ListPersonalRecordTimeline(request, metadata=api.token(user))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.ListPersonalRecordTimeline(
            analytics_service_pb2.ListPersonalRecordTimelineRequest(parent="users/me", page_size=101),
            metadata=api.token(user),
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_platform_metrics_for_admins_from_daily_aggregates(api: AnalyticsApi) -> None:
    a, b, c, d = new_user(), new_user(), new_user(), new_user()
    lift = [Lift(*ROW, 2, 20, 100)]
    await api.feed(
        user_registered(c, at(2024, 6, 4, 10)),
        session_completed(a, "a1", at(2024, 6, 3, 8), "UTC", lift),
        session_completed(a, "a2", at(2024, 6, 3, 18), "UTC", lift),
        session_completed(a, "a3", at(2024, 6, 5, 9), "UTC", lift),
        # 20:00 UTC is the next morning in Tokyo; platform days are UTC days.
        session_completed(b, "b1", at(2024, 6, 5, 20), "Asia/Tokyo", lift),
        session_completed(c, "c1", at(2024, 6, 10, 7), "UTC", lift),
    )
    request = analytics_service_pb2.GetPlatformMetricsRequest(start_date="2024-06-03", end_date="2024-06-11")

    def figures(reply: analytics_pb2.PlatformMetrics) -> Figures:
        return (
            [(d.date, d.active_users, d.sessions_completed, d.new_users) for d in reply.days],
            [(w.week_start_date, w.active_users, w.sessions_completed) for w in reply.weeks],
        )

    expected_days = [
        ("2024-06-03", 1, 2, 0), ("2024-06-04", 0, 0, 1), ("2024-06-05", 2, 2, 0), ("2024-06-06", 0, 0, 0),
        ("2024-06-07", 0, 0, 0), ("2024-06-08", 0, 0, 0), ("2024-06-09", 0, 0, 0), ("2024-06-10", 1, 1, 0),
        ("2024-06-11", 0, 0, 0),
    ]
    expected_weeks = [("2024-06-03", 2, 4), ("2024-06-10", 1, 1)]
    first = await api.stub.GetPlatformMetrics(request, metadata=api.admin())
    assert (first.start_date, first.end_date) == ("2024-06-03", "2024-06-11")
    assert figures(first) == (expected_days, expected_weeks)
    # The second read comes from the sealed daily and weekly aggregates, with the same figures.
    assert figures(await api.stub.GetPlatformMetrics(request, metadata=api.service())) == figures(first)

    # A late session for a sealed day re-opens that day and its week.
    await api.feed(session_completed(d, "d1", at(2024, 6, 5, 12), "UTC", lift))
    expected_days[2] = ("2024-06-05", 3, 3, 0)
    expected_weeks[0] = ("2024-06-03", 3, 5)
    assert figures(await api.stub.GetPlatformMetrics(request, metadata=api.admin())) == (expected_days, expected_weeks)
    partial = await api.stub.GetPlatformMetrics(
        analytics_service_pb2.GetPlatformMetricsRequest(start_date="2024-06-05", end_date="2024-06-05"),
        metadata=api.admin(),
    )
    assert figures(partial)[1] == [("2024-06-03", 3, 3)]  # only the days inside the range

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetPlatformMetrics(request, metadata=api.token(a))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    for start, end, field in (
        ("2024-06-11", "2024-06-03", "end_date"),
        ("2024-02-30", "2024-03-01", "start_date"),
        ("2023-01-01", "2024-06-01", "end_date"),
        ("2024-6-1", "2024-06-01", "start_date"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await api.stub.GetPlatformMetrics(
                analytics_service_pb2.GetPlatformMetricsRequest(start_date=start, end_date=end), metadata=api.admin()
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (start, end)
        assert violations(err.value) == [field]


async def test_only_the_owner_or_an_admin_reads_a_users_analytics(api: AnalyticsApi) -> None:
    alice, bob = new_user(), new_user()
    await api.feed(
        session_completed(alice, "x", datetime(2025, 3, 11, 9, tzinfo=UTC), "UTC", [Lift(*SQUAT, 3, 15, 900)]),
        record_achieved(alice, "r", "x", "barbell-back-squat", 100, datetime(2025, 3, 11, 9, tzinfo=UTC)),
    )
    as_bob = api.token(bob)
    start, end = ts(datetime(2025, 3, 1, tzinfo=UTC)), ts(datetime(2025, 3, 12, tzinfo=UTC))
    calls: list[Awaitable[object]] = [
        api.stub.GetUserStats(analytics_service_pb2.GetUserStatsRequest(name=f"users/{alice}/stats"), metadata=as_bob),
        api.stub.ListPersonalRecordTimeline(
            analytics_service_pb2.ListPersonalRecordTimelineRequest(parent=f"users/{alice}"), metadata=as_bob
        ),
        api.stub.GetExerciseTrend(
            analytics_service_pb2.GetExerciseTrendRequest(
                name=f"users/{alice}/exerciseTrends/barbell-back-squat", start_time=start
            ),
            metadata=as_bob,
        ),
        api.stub.GetPeriodReport(
            analytics_service_pb2.GetPeriodReportRequest(
                name=f"users/{alice}/periodReport", start_time=start, end_time=end
            ),
            metadata=as_bob,
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Bob has no data yet: empty statistics, not NOT_FOUND.
    assert (await stats_of(api, bob)).total_sessions == 0
    seen = await api.stub.GetUserStats(
        analytics_service_pb2.GetUserStatsRequest(name=f"users/{alice}/stats"), metadata=api.admin()
    )
    assert (seen.total_sessions, seen.total_volume_kg, seen.total_personal_records) == (1, 900.0, 1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetUserStats(
            analytics_service_pb2.GetUserStatsRequest(name=f"users/{new_user()}/stats"), metadata=api.admin()
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetUserStats(analytics_service_pb2.GetUserStatsRequest(name="users/me/stats"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetUserStats(analytics_service_pb2.GetUserStatsRequest(name="people/x"), metadata=as_bob)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_account_deletion_erases_the_user_and_keeps_anonymous_platform_counts(api: AnalyticsApi) -> None:
    user = new_user()
    session = session_completed(user, "e1", at(2024, 7, 1, 9), "UTC", [Lift(*BENCH, 3, 24, 1200)])
    await api.feed(
        user_registered(user, at(2024, 7, 1, 8)),
        session,
        session_completed(user, "e2", at(2024, 7, 2, 9), "UTC", [Lift(*BENCH, 3, 24, 1300)]),
        record_achieved(user, "pr", "e2", "bench-press", 90, at(2024, 7, 2, 9)),
    )
    metrics_request = analytics_service_pb2.GetPlatformMetricsRequest(start_date="2024-07-01", end_date="2024-07-02")
    before = await api.stub.GetPlatformMetrics(metrics_request, metadata=api.admin())
    assert [(d.active_users, d.sessions_completed, d.new_users) for d in before.days] == [(1, 1, 1), (1, 1, 0)]
    assert api.repo is not None and await api.repo.user_data_left(user) > 0

    request_id = uuid.uuid4().hex
    deletion = user_deleted(user, request_id)
    await api.feed(deletion)
    assert await api.repo.user_data_left(user) == 0
    # The owner's still-valid token sees an empty account; an admin no longer finds it.
    assert await stats_of(api, user) == analytics_pb2.UserStats(name=f"users/{user}/stats")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.stub.GetUserStats(
            analytics_service_pb2.GetUserStatsRequest(name=f"users/{user}/stats"), metadata=api.admin()
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    timeline = await api.stub.ListPersonalRecordTimeline(
        analytics_service_pb2.ListPersonalRecordTimelineRequest(parent="users/me"), metadata=api.token(user)
    )
    assert list(timeline.personal_records) == []
    # Platform counts stay, anonymous (the partial week is counted from the anonymised markers).
    after = await api.stub.GetPlatformMetrics(metrics_request, metadata=api.admin())
    assert after == before

    erased = await api.published("DataErased", user)
    assert [(e.data_erased.service, e.data_erased.deletion_request_id) for e in erased] == [("analytics", request_id)]
    assert erased[0].event_id == fact_id("analytics.data_erased", request_id)

    # Late and repeated events change nothing: the user stays erased, DataErased stays one event.
    await api.feed(session, deletion)
    assert await api.repo.user_data_left(user) == 0
    assert len(await api.published("DataErased", user)) == 1
    assert await api.stub.GetPlatformMetrics(metrics_request, metadata=api.admin()) == before


async def test_events_arrive_through_the_bus_and_milestones_leave_through_it(api: AnalyticsApi) -> None:
    bus = api.running.resources.events
    user = new_user()
    received: asyncio.Queue[events_pb2.EventEnvelope] = asyncio.Queue()

    async def observe(envelope: events_pb2.EventEnvelope) -> None:
        if envelope.user == f"users/{user}":
            await received.put(envelope)

    observer = asyncio.create_task(
        bus.consumer(f"observer-{uuid.uuid4().hex[:8]}", [stream_of("analytics")], observe,
                     api.running.resources.store)()
    )
    try:
        sessions = [
            session_completed(user, f"bus{d}", datetime(2025, 3, d, 18, tzinfo=UTC), "UTC", [Lift(*ROW, 3, 30, 600)])
            for d in (9, 10, 11)
        ]
        for envelope in sessions:
            await bus.publish(envelope)
        await bus.publish(sessions[0])  # a duplicate entry: the consumer group sees the event id again
        milestone = await asyncio.wait_for(received.get(), timeout=20)
        assert milestone.streak_milestone_reached == events_pb2.StreakMilestoneReached(
            streak_days=3, session=f"users/{user}/sessions/bus11"
        )
        # Entries of one stream are handled in order: once a later marker is in, all before it are.
        marker = new_user()
        await bus.publish(session_completed(marker, "m", datetime(2025, 3, 11, tzinfo=UTC), "UTC", []))
        deadline = time.monotonic() + 20
        while (await stats_of(api, marker)).total_sessions == 0:
            assert time.monotonic() < deadline, "the consumer did not handle the marker event"
            await asyncio.sleep(0.05)
        stats = await stats_of(api, user)
        assert (stats.total_sessions, stats.total_volume_kg, stats.current_streak_days) == (3, 1800.0, 3)
        assert received.empty()
    finally:
        observer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await observer


async def test_health_reports_serving(api: AnalyticsApi) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "fittracker.analytics.v1.AnalyticsService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
