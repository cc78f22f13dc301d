"""The pure rules behind the read models: runs, milestones once per streak, muscle credit, percentages."""

from __future__ import annotations

from datetime import UTC, date, datetime

from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.events.v1 import events_pb2

from services.analytics.projections import (
    LocalTime,
    Run,
    advance_streak,
    change_percent,
    current_streak,
    field_key,
    muscle_breakdown,
    run_containing,
)


def d(day: int, month: int = 3) -> date:
    return date(2025, month, day)


def test_a_run_is_the_maximal_block_of_consecutive_days() -> None:
    active = {d(1), d(2), d(3), d(5), d(6)}
    assert run_containing(active, d(2)) == Run(d(1), d(3))
    assert run_containing(active | {d(4)}, d(4)) == Run(d(1), d(6))
    assert Run(d(1), d(6)).days == 6
    assert current_streak(Run(d(1), d(6)), today=d(7)) == 6
    assert current_streak(Run(d(1), d(6)), today=d(8)) == 0
    assert current_streak(None, today=d(8)) == 0


def test_a_milestone_is_published_once_per_streak_even_when_runs_merge_or_grow_backwards() -> None:
    first = advance_streak(None, None, [], Run(d(1), d(3)), event_day=d(3))
    assert first.reached == [(3, d(3))]
    second = advance_streak(first.latest, first.longest, first.records, Run(d(5), d(7)), event_day=d(7))
    assert second.reached == [(3, d(7))]  # a new streak reaches 3 again
    merged = advance_streak(second.latest, second.longest, second.records, Run(d(1), d(7)), event_day=d(4))
    assert merged.reached == [(7, d(7))]  # 3 was announced for both halves already
    assert (merged.latest, merged.longest) == (Run(d(1), d(7)), Run(d(1), d(7)))
    backwards = advance_streak(merged.latest, merged.longest, merged.records, Run(date(2025, 2, 28), d(7)), d(7))
    assert backwards.reached == []
    again = advance_streak(merged.latest, merged.longest, merged.records, Run(d(1), d(7)), event_day=d(7))
    assert again.reached == []


def test_history_that_arrives_late_is_counted_but_not_announced() -> None:
    update = advance_streak(None, None, [], Run(date(2024, 1, 1), date(2024, 1, 9)), event_day=d(12))
    assert update.reached == []
    assert update.longest.days == 9


def test_an_older_run_never_replaces_the_latest_one() -> None:
    latest, longest = Run(d(10), d(11)), Run(d(1), d(5))
    update = advance_streak(latest, longest, [], Run(d(1), d(6)), event_day=d(6))
    assert (update.latest, update.longest) == (latest, Run(d(1), d(6)))


def test_volume_counts_in_full_for_each_primary_group_once() -> None:
    exercises = [
        events_pb2.ExerciseSummary(
            primary_muscle_groups=[fit.MUSCLE_GROUP_GLUTES, fit.MUSCLE_GROUP_HAMSTRINGS, fit.MUSCLE_GROUP_GLUTES,
                                   fit.MUSCLE_GROUP_UNSPECIFIED],
            secondary_muscle_groups=[fit.MUSCLE_GROUP_LOWER_BACK],
            set_count=3, total_volume_kg=1500,
        ),
        events_pb2.ExerciseSummary(primary_muscle_groups=[fit.MUSCLE_GROUP_GLUTES], set_count=2, total_volume_kg=400),
    ]
    assert muscle_breakdown(exercises) == {
        "MUSCLE_GROUP_GLUTES": {"volume": 1900.0, "sets": 5},
        "MUSCLE_GROUP_HAMSTRINGS": {"volume": 1500.0, "sets": 3},
    }


def test_local_calendar_and_percentages() -> None:
    # 23:30 on Sunday in Los Angeles is Monday 06:30 UTC.
    place = LocalTime.of(datetime(2025, 3, 10, 6, 30, tzinfo=UTC), "America/Los_Angeles")
    assert (place.day, place.week, place.month) == (d(9), d(3), "2025-03")
    assert LocalTime.of(datetime(2025, 3, 10, 6, 30, tzinfo=UTC), "Not/AZone").day == d(10)  # unknown: UTC
    assert change_percent(150, 100) == 50.0
    assert change_percent(0, 4) == -100.0
    assert change_percent(3, 0) is None


def test_ids_become_safe_field_names() -> None:
    assert field_key("abc-123_x") == "abc-123_x"
    unsafe = field_key("a.b$c")
    assert "." not in unsafe and "$" not in unsafe and unsafe == field_key("a.b$c")
