"""Pure rules: quiet hours, message wording, backoff, exercise names, configuration checks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2
from fittracker.user.v1 import user_pb2

from services.notification import content
from services.notification.config import NotificationConfig
from services.notification.delivery import in_quiet_hours
from services.notification.directory import humanize
from services.runtime.settings import SettingsError


def quiet(start: int, end: int) -> user_pb2.NotificationSettings:
    return user_pb2.NotificationSettings(quiet_hours_start_minute=start, quiet_hours_end_minute=end)


@pytest.mark.parametrize(
    ("start", "end", "zone", "utc_time", "expected"),
    [
        (22 * 60, 7 * 60, "UTC", "23:30", True),  # wraps past midnight
        (22 * 60, 7 * 60, "UTC", "06:59", True),
        (22 * 60, 7 * 60, "UTC", "07:00", False),  # the end is exclusive
        (22 * 60, 7 * 60, "UTC", "12:00", False),
        (13 * 60, 14 * 60, "UTC", "13:00", True),  # the start is inclusive
        (22 * 60, 7 * 60, "Asia/Tokyo", "14:00", True),  # 23:00 in Tokyo
        (22 * 60, 7 * 60, "America/New_York", "03:00", True),  # 22:00 or 23:00 in New York
        (22 * 60, 7 * 60, "Not/AZone", "23:00", True),  # unknown zone: UTC
        (600, 600, "UTC", "10:00", False),  # start == end: no quiet hours
    ],
)
def test_quiet_hours(start: int, end: int, zone: str, utc_time: str, expected: bool) -> None:
    hour, minute = map(int, utc_time.split(":"))
    at = datetime(2026, 1, 15, hour, minute, tzinfo=UTC)
    assert in_quiet_hours(quiet(start, end), zone, at) is expected


def test_records_read_naturally_in_both_unit_systems() -> None:
    metric, imperial = content.Units(user_pb2.UNIT_SYSTEM_METRIC), content.Units(user_pb2.UNIT_SYSTEM_IMPERIAL)
    e1rm = events_pb2.PersonalRecordAchieved(
        kind=fitness_pb2.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX, value=132.5, previous_value=130.0,
        weight_kg=115.0, reps=5)
    assert content.personal_record(e1rm, "Bench press", metric).body == (
        "Bench press: estimated one-rep max 132.5 kg (+2.5 kg), from 115 kg x 5.")
    reps = events_pb2.PersonalRecordAchieved(
        kind=fitness_pb2.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT, value=12, previous_value=10, weight_kg=60)
    assert content.personal_record(reps, "Pull-up", imperial).body == (
        "Pull-up: 12 reps at 132.3 lb, 2 more than before.")
    first = events_pb2.PersonalRecordAchieved(kind=fitness_pb2.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME, value=4200)
    assert content.personal_record(first, "Deadlift", metric).body == (
        "Deadlift: 4,200 kg of volume in one session. Your first record of its kind.")


def test_long_streaks_are_also_emailed() -> None:
    assert len(content.streak_milestone(events_pb2.StreakMilestoneReached(streak_days=7)).channels) == 1
    assert len(content.streak_milestone(events_pb2.StreakMilestoneReached(streak_days=30)).channels) == 2


def test_exercise_ids_become_names() -> None:
    assert humanize("exercises/barbell-back-squat") == "Barbell back squat"
    assert humanize("exercises/romanian_deadlift") == "Romanian deadlift"
    assert humanize("exercises/8f14e45fceea167a") == "your exercise"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"FITTRACKER_SMTP_PORT": "0"}, "FITTRACKER_SMTP_PORT"),
        ({"FITTRACKER_SMTP_PORT": "many"}, "FITTRACKER_SMTP_PORT"),
        ({"FITTRACKER_SMTP_SECURITY": "ssl"}, "FITTRACKER_SMTP_SECURITY"),
        ({"FITTRACKER_SMTP_HOST": "smtp.example.com", "FITTRACKER_SMTP_SECURITY": "none"}, "FITTRACKER_SMTP_SECURITY"),
        ({"FITTRACKER_FCM_ENDPOINT": "http://fcm.example.com"}, "FITTRACKER_FCM_ENDPOINT"),
        ({"FITTRACKER_SMS_ENDPOINT": "ftp://sms"}, "FITTRACKER_SMS_ENDPOINT"),
        ({"FITTRACKER_SMS_ENDPOINT": "https://sms.example.com/v1/messages"}, "FITTRACKER_SMS_ENDPOINT"),
        ({"FITTRACKER_APNS_KEY_FILE": "/keys/AuthKey.p8"}, "FITTRACKER_APNS_KEY_FILE"),
        ({"FITTRACKER_DELIVERY_MAX_ATTEMPTS": "0"}, "FITTRACKER_DELIVERY_MAX_ATTEMPTS"),
        ({"FITTRACKER_RETRY_BASE_SECONDS": "600"}, "FITTRACKER_RETRY_BASE_SECONDS"),
        ({"FITTRACKER_POLL_INTERVAL_SECONDS": "0"}, "FITTRACKER_POLL_INTERVAL_SECONDS"),
    ],
)
def test_bad_configuration_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        NotificationConfig.from_env(env)


def test_production_refuses_placeholder_secrets() -> None:
    env = {"FITTRACKER_SMS_ENDPOINT": "https://sms.example.com/v1/messages", "FITTRACKER_SMS_API_KEY": "changeme"}
    assert NotificationConfig.from_env(env).sms_api_key == "changeme"
    with pytest.raises(SettingsError, match="FITTRACKER_SMS_API_KEY"):
        NotificationConfig.from_env(env, environment="production")


def test_defaults_turn_every_provider_off() -> None:
    config = NotificationConfig.from_env({})
    assert (config.smtp_host, config.fcm_enabled, config.apns_enabled, config.sms_endpoint) == ("", False, False, "")
