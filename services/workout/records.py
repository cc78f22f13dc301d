"""Pure training arithmetic: volume, estimated one-rep maxima, record candidates, exercise summaries.

Nothing here reads or writes storage, so every rule of the contract (fitness.proto's
PersonalRecordKind, events.proto's ExerciseSummary) is checked by plain unit tests. Sets are the
stored set documents of one session, in the order they were logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from fittracker.common.v1 import fitness_pb2
from fittracker.events.v1 import events_pb2

from services.workout.catalog import Catalog

WARMUP = "SET_TYPE_WARMUP"
#: Epley's estimate is only trusted for sets of 1 to 12 reps (fitness.proto).
E1RM_MAX_REPS = 12

HEAVIEST_WEIGHT = fitness_pb2.PERSONAL_RECORD_KIND_HEAVIEST_WEIGHT
BEST_E1RM = fitness_pb2.PERSONAL_RECORD_KIND_BEST_ESTIMATED_ONE_REP_MAX
MOST_REPS_AT_WEIGHT = fitness_pb2.PERSONAL_RECORD_KIND_MOST_REPS_AT_WEIGHT
BEST_SESSION_VOLUME = fitness_pb2.PERSONAL_RECORD_KIND_BEST_SESSION_VOLUME

#: The part of a record's id that names its kind; most-reps records add the weight.
_KIND_SLUGS = {
    HEAVIEST_WEIGHT: "heaviest-weight",
    BEST_E1RM: "best-estimated-1rm",
    MOST_REPS_AT_WEIGHT: "most-reps-at",
    BEST_SESSION_VOLUME: "best-session-volume",
}


def epley(weight_kg: float, reps: int) -> float:
    """Epley's estimated one-rep maximum, weight * (1 + reps / 30), to 0.1 kg; 0 when it does not apply.

    Rounded to 0.1 kg, the precision the apps show: a record must beat the previous one by a
    visible amount, never by floating-point noise.
    """
    if weight_kg <= 0 or not 1 <= reps <= E1RM_MAX_REPS:
        return 0.0
    return round(weight_kg * (1 + reps / 30), 1)


def counts(workout_set: dict[str, Any]) -> bool:
    """Whether a set counts towards volume, summaries and records: every set but warm-ups."""
    return bool(workout_set["set_type"] != WARMUP)


def set_volume(workout_set: dict[str, Any]) -> float:
    """Reps times kilograms of one set."""
    return float(workout_set["reps"]) * float(workout_set["weight_kg"])


def session_volume(sets: Iterable[dict[str, Any]]) -> float:
    """The volume of a session: reps times kilograms over the sets that are not warm-ups."""
    return round(sum(set_volume(s) for s in sets if counts(s)), 2)


def weight_key(weight_kg: float) -> float:
    """The weight a most-reps record is kept at: kilograms to 0.01, so 100 and 100.0000001 are one weight."""
    return round(weight_kg, 2)


@dataclass(frozen=True)
class Candidate:
    """The best a session did for one record: it becomes a record if it beats the stored one."""

    exercise: str
    kind: fitness_pb2.PersonalRecordKind.ValueType
    value: float
    weight_kg: float
    reps: int
    #: The set that did it; empty for session-volume records.
    set_id: str

    @property
    def record_id(self) -> str:
        """The record's id within its user, e.g. "barbell-bench-press_most-reps-at-102_5kg"."""
        exercise_id = self.exercise.removeprefix("exercises/")
        slug = _KIND_SLUGS[self.kind]
        if self.kind == MOST_REPS_AT_WEIGHT:
            slug += f"-{self.weight_kg:g}kg".replace(".", "_")
        return f"{exercise_id}_{slug}"

    @property
    def sort_key(self) -> str:
        """Orders records by exercise, then kind, then weight, as ListPersonalRecords returns them.

        The separator is a space, which sorts before every character of an id, so that
        "squat" comes before "squat-jump".
        """
        weight = self.weight_kg if self.kind == MOST_REPS_AT_WEIGHT else 0.0
        return f"{self.exercise.removeprefix('exercises/')} {self.kind:02d} {weight:010.2f}"


def _first_best(sets: Sequence[dict[str, Any]], score: Any) -> dict[str, Any] | None:
    """The earliest set with the highest ``score`` (sets scoring None are skipped)."""
    best: dict[str, Any] | None = None
    best_score: Any = None
    for s in sets:
        value = score(s)
        if value is not None and (best_score is None or value > best_score):
            best, best_score = s, value
    return best


def candidates(sets: Sequence[dict[str, Any]]) -> list[Candidate]:
    """The record candidates of a session's sets, per exercise and kind, warm-ups excluded."""
    by_exercise: dict[str, list[dict[str, Any]]] = {}
    for s in sets:
        if counts(s):
            by_exercise.setdefault(s["exercise"], []).append(s)
    found: list[Candidate] = []
    for exercise, done in by_exercise.items():
        heaviest = _first_best(
            done, lambda s: (s["weight_kg"], s["reps"]) if s["weight_kg"] > 0 and s["reps"] >= 1 else None
        )
        if heaviest is not None:
            found.append(Candidate(exercise, HEAVIEST_WEIGHT, float(heaviest["weight_kg"]),
                                   float(heaviest["weight_kg"]), int(heaviest["reps"]), heaviest["id"]))
        strongest = _first_best(done, lambda s: epley(s["weight_kg"], s["reps"]) or None)
        if strongest is not None:
            found.append(Candidate(exercise, BEST_E1RM, epley(strongest["weight_kg"], strongest["reps"]),
                                   float(strongest["weight_kg"]), int(strongest["reps"]), strongest["id"]))
        for weight in sorted({weight_key(s["weight_kg"]) for s in done if s["reps"] >= 1}):
            most = _first_best(
                done, lambda s, w=weight: s["reps"] if s["reps"] >= 1 and weight_key(s["weight_kg"]) == w else None
            )
            assert most is not None  # the weight came from a set with reps
            found.append(
                Candidate(exercise, MOST_REPS_AT_WEIGHT, float(most["reps"]), weight, int(most["reps"]), most["id"])
            )
        volume = round(sum(set_volume(s) for s in done), 2)
        if volume > 0:
            found.append(Candidate(exercise, BEST_SESSION_VOLUME, volume, 0.0, 0, ""))
    return sorted(found, key=lambda c: c.sort_key)


def summaries(sets: Sequence[dict[str, Any]], catalog: Catalog) -> list[events_pb2.ExerciseSummary]:
    """One ExerciseSummary per exercise with sets that count, in the order first done."""
    by_exercise: dict[str, list[dict[str, Any]]] = {}
    for s in sets:
        if counts(s):
            by_exercise.setdefault(s["exercise"], []).append(s)
    out = []
    for exercise, done in by_exercise.items():
        # The best set is the one with the highest estimated 1RM; where no set has one (high reps,
        # no load), the heaviest, then the one with most reps.
        best = _first_best(done, lambda s: epley(s["weight_kg"], s["reps"]) or None) or _first_best(
            done, lambda s: (s["weight_kg"], s["reps"])
        )
        assert best is not None  # ``done`` is never empty
        entry = catalog.get(exercise)
        summary = events_pb2.ExerciseSummary(
            exercise=exercise,
            set_count=len(done),
            total_reps=sum(int(s["reps"]) for s in done),
            total_volume_kg=round(sum(set_volume(s) for s in done), 2),
            best_set_weight_kg=float(best["weight_kg"]),
            best_set_reps=int(best["reps"]),
            estimated_one_rep_max_kg=epley(best["weight_kg"], best["reps"]),
            total_duration_seconds=sum(int(s["duration_seconds"]) for s in done),
            total_distance_m=round(sum(float(s["distance_m"]) for s in done), 2),
        )
        if entry is not None:
            summary.primary_muscle_groups.extend(entry.exercise.primary_muscle_groups)
            summary.secondary_muscle_groups.extend(entry.exercise.secondary_muscle_groups)
        out.append(summary)
    return out
