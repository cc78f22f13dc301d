"""What a notification about a domain event says, in the user's units.

Figures are stored metric; a user who chose imperial units reads pounds. Numbers are rounded
the way a lifter reads them (120 kg, 12.5 kg, 4,200 kg of volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2
from fittracker.notification.v1 import notification_pb2
from fittracker.user.v1 import user_pb2

KG_TO_LB = 2.2046226218


@dataclass(frozen=True)
class Content:
    """The words and routing of one notification."""

    title: str
    body: str
    category: notification_pb2.Category.ValueType
    data: dict[str, str] = field(default_factory=dict)
    #: External channels to try (the inbox is implied); each still needs the user's consent.
    channels: tuple[notification_pb2.Channel.ValueType, ...] = (notification_pb2.CHANNEL_PUSH,)


class Units:
    """Formats weights in the user's unit system."""

    def __init__(self, unit_system: int) -> None:
        """Format for ``unit_system`` (a user_pb2.UnitSystem)."""
        self.imperial = unit_system == user_pb2.UNIT_SYSTEM_IMPERIAL

    def weight(self, kg: float) -> str:
        """A load, e.g. "120 kg" or "264.5 lb"."""
        value, unit = (kg * KG_TO_LB, "lb") if self.imperial else (kg, "kg")
        return f"{_number(value)} {unit}"

    def volume(self, kg: float) -> str:
        """A training volume, rounded to a whole number, e.g. "4,200 kg"."""
        value, unit = (kg * KG_TO_LB, "lb") if self.imperial else (kg, "kg")
        return f"{round(value):,} {unit}"


def _number(value: float) -> str:
    """At most one decimal, none when whole: 120, 12.5."""
    rounded = round(value, 1)
    return f"{rounded:,.0f}" if rounded == int(rounded) else f"{rounded:,.1f}"


def personal_record(event: events_pb2.PersonalRecordAchieved, exercise_name: str, units: Units) -> Content:
    """"New personal record!" with what was beaten and by how much."""
    kind = event.kind
    has_previous = event.HasField("previous_value")
    gain = event.value - event.previous_value if has_previous else 0.0
    if kind == fitness_pb2.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT:
        reps = int(event.value)
        text = f"{reps} reps at {units.weight(event.weight_kg)}"
        more = f", {int(gain)} more than before" if has_previous and gain > 0 else ""
        body = f"{exercise_name}: {text}{more}."
    elif kind == fitness_pb2.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME:
        more = f" (+{units.volume(gain)})" if has_previous and gain > 0 else ""
        body = f"{exercise_name}: {units.volume(event.value)} of volume in one session{more}."
    elif kind == fitness_pb2.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX:
        more = f" (+{units.weight(gain)})" if has_previous and gain > 0 else ""
        from_set = f", from {units.weight(event.weight_kg)} x {event.reps}" if event.reps else ""
        body = f"{exercise_name}: estimated one-rep max {units.weight(event.value)}{more}{from_set}."
    else:
        more = f", {units.weight(gain)} more than before" if has_previous and gain > 0 else ""
        body = f"{exercise_name}: {units.weight(event.value)}, your heaviest yet{more}."
    if not has_previous:
        body = body.rstrip(".") + ". Your first record of its kind."
    data = {"personal_record": event.personal_record, "exercise": event.exercise, "session": event.session}
    return Content(
        title="New personal record!", body=body, category=notification_pb2.CATEGORY_PERSONAL_RECORD,
        data={k: v for k, v in data.items() if v},
    )


def session_completed(event: events_pb2.SessionCompleted, units: Units) -> Content:
    """"Workout complete" with duration, sets, volume and records."""
    parts: list[str] = []
    if event.HasField("start_time") and event.HasField("end_time"):
        minutes = max(0, round((event.end_time.ToSeconds() - event.start_time.ToSeconds()) / 60))
        parts.append(f"{minutes} min")
    parts.append(f"{event.total_sets} set{'s' if event.total_sets != 1 else ''}")
    if event.total_volume_kg > 0:
        parts.append(f"{units.volume(event.total_volume_kg)} lifted")
    body = "Nice work: " + ", ".join(parts) + "."
    if event.personal_record_count:
        count = event.personal_record_count
        body += f" You set {count} personal record{'s' if count != 1 else ''}!"
    return Content(
        title="Workout complete", body=body, category=notification_pb2.CATEGORY_WORKOUT_COMPLETED,
        data={"session": event.session} if event.session else {},
    )


def streak_milestone(event: events_pb2.StreakMilestoneReached) -> Content:
    """"N-day streak!"; long streaks are worth an email too."""
    days = event.streak_days
    body = f"You have trained {days} days in a row. Keep the streak going!"
    channels: tuple[notification_pb2.Channel.ValueType, ...] = (notification_pb2.CHANNEL_PUSH,)
    if days >= 30:
        channels = (notification_pb2.CHANNEL_PUSH, notification_pb2.CHANNEL_EMAIL)
    return Content(
        title=f"{days}-day streak!", body=body, category=notification_pb2.CATEGORY_STREAK_MILESTONE,
        data={"session": event.session, "streak_days": str(days)} if event.session else {"streak_days": str(days)},
        channels=channels,
    )


def registration_attempted() -> Content:
    """Tell an account's owner that someone signed up with their address: by email, where they read it."""
    return Content(
        title="Someone tried to sign up with your email",
        body=(
            "An account was requested with your email address. If it was you, sign in with your "
            "password instead. If it was not, nothing changed: your account and its data are as they were."
        ),
        category=notification_pb2.CATEGORY_SYSTEM,
        channels=(notification_pb2.CHANNEL_EMAIL,),
    )
