"""The exercise catalog as the ai service sees it: what each exercise trains and needs.

The catalog belongs to the workout service; ``Peers`` reads it through ListExercises and caches
it. ``FALLBACK`` is a small copy of well-known entries (same names as the workout catalog) used
only when the workout service cannot be reached and nothing is cached yet, so a degraded answer
still names real exercises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.workout.v1 import workout_pb2

Muscle: TypeAlias = fit.MuscleGroup.ValueType
Equipment: TypeAlias = fit.Equipment.ValueType

BODYWEIGHT = fit.EQUIPMENT_BODYWEIGHT
WEIGHT_AND_REPS = workout_pb2.EXERCISE_MEASUREMENT_WEIGHT_AND_REPS
REPS_ONLY = workout_pb2.EXERCISE_MEASUREMENT_REPS
#: Equipment whose loads come in 2.5 kg plate steps; the rest (dumbbells, kettlebells) in 1 kg.
PLATE_LOADED = frozenset({fit.EQUIPMENT_BARBELL, fit.EQUIPMENT_MACHINE, fit.EQUIPMENT_CABLE})


@dataclass(frozen=True)
class CatalogExercise:
    """One catalog exercise, reduced to what planning and recommending need."""

    name: str
    display_name: str
    primary: frozenset[Muscle]
    secondary: frozenset[Muscle]
    equipment: frozenset[Equipment]
    pattern: int
    compound: bool
    measurement: int

    @classmethod
    def from_proto(cls, exercise: workout_pb2.Exercise) -> CatalogExercise:
        """Convert the workout service's message."""
        return cls(
            name=exercise.name,
            display_name=exercise.display_name,
            primary=frozenset(exercise.primary_muscle_groups),
            secondary=frozenset(exercise.secondary_muscle_groups),
            equipment=frozenset(exercise.equipment) - {fit.EQUIPMENT_UNSPECIFIED},
            pattern=exercise.movement_pattern,
            compound=exercise.is_compound,
            measurement=exercise.measurement or WEIGHT_AND_REPS,
        )

    def usable_with(self, available: frozenset[Equipment]) -> bool:
        """Whether ``available`` equipment (body weight always included) covers what it needs."""
        return self.equipment <= (available | {BODYWEIGHT})

    @property
    def loadable(self) -> bool:
        """Whether sets carry a load worth prescribing in kilograms."""
        return self.measurement == WEIGHT_AND_REPS

    @property
    def counts_reps(self) -> bool:
        """Whether sets are counted in repetitions (rather than time or distance)."""
        return self.measurement in (WEIGHT_AND_REPS, REPS_ONLY)

    def load_step(self) -> float:
        """The smallest sensible change of load in kilograms."""
        return 2.5 if self.equipment & PLATE_LOADED else 1.0


#: Staple lifts, best first: between otherwise equal candidates, plans and recommendations pick
#: the well-known lift over the exotic one (a deadlift over a good morning). Names absent from the
#: catalog are simply never matched.
STAPLES: tuple[str, ...] = tuple(f"exercises/{slug}" for slug in (
    # Loaded lifts first, then their usual variants, then body-weight staples.
    "barbell-back-squat", "conventional-deadlift", "barbell-bench-press", "barbell-overhead-press",
    "barbell-bent-over-row", "pull-up", "romanian-deadlift", "goblet-squat", "dumbbell-bench-press",
    "one-arm-dumbbell-row", "lat-pulldown", "seated-cable-row", "seated-dumbbell-shoulder-press",
    "dumbbell-romanian-deadlift", "leg-press", "barbell-front-squat", "incline-barbell-bench-press",
    "incline-dumbbell-bench-press", "pendlay-row", "chin-up", "push-up", "bodyweight-squat", "inverted-row",
    "bodyweight-lunge", "glute-bridge", "pike-push-up", "plank", "burpee",
))
_STAPLE_RANK = {name: i for i, name in enumerate(STAPLES)}


def staple_rank(name: str) -> int:
    """The position of ``name`` among the staples; after all of them when it is not one."""
    return _STAPLE_RANK.get(name, len(STAPLES))


def round_load(kilograms: float, step: float) -> float:
    """``kilograms`` to the nearest ``step``, never below zero."""
    return max(0.0, round(kilograms / step) * step)


def by_name(exercises: Iterable[CatalogExercise]) -> dict[str, CatalogExercise]:
    """Index exercises by resource name."""
    return {e.name: e for e in exercises}


def _entry(slug: str, title: str, primary: tuple[Muscle, ...], secondary: tuple[Muscle, ...],
           equipment: tuple[Equipment, ...],
           pattern: int, compound: bool, measurement: int = WEIGHT_AND_REPS) -> CatalogExercise:
    return CatalogExercise(f"exercises/{slug}", title, frozenset(primary), frozenset(secondary), frozenset(equipment),
                           pattern, compound, measurement)


_Q, _G, _H, _LB = fit.MUSCLE_GROUP_QUADRICEPS, fit.MUSCLE_GROUP_GLUTES, fit.MUSCLE_GROUP_HAMSTRINGS, \
    fit.MUSCLE_GROUP_LOWER_BACK
_C, _S, _T, _B = fit.MUSCLE_GROUP_CHEST, fit.MUSCLE_GROUP_SHOULDERS, fit.MUSCLE_GROUP_TRICEPS, fit.MUSCLE_GROUP_BICEPS
_L, _UB, _AB = fit.MUSCLE_GROUP_LATS, fit.MUSCLE_GROUP_UPPER_BACK, fit.MUSCLE_GROUP_ABDOMINALS
_BB, _DB, _BW, _BN = fit.EQUIPMENT_BARBELL, fit.EQUIPMENT_DUMBBELL, fit.EQUIPMENT_BODYWEIGHT, fit.EQUIPMENT_BENCH
_BAR = fit.EQUIPMENT_PULL_UP_BAR
P = fit  # movement patterns live in the same module

FALLBACK: tuple[CatalogExercise, ...] = (
    _entry("barbell-back-squat", "Barbell Back Squat", (_Q, _G), (_H, _LB), (_BB,), P.MOVEMENT_PATTERN_SQUAT, True),
    _entry("goblet-squat", "Goblet Squat", (_Q, _G), (_AB,), (_DB,), P.MOVEMENT_PATTERN_SQUAT, True),
    _entry("bodyweight-squat", "Bodyweight Squat", (_Q, _G), (_H,), (_BW,), P.MOVEMENT_PATTERN_SQUAT, True, REPS_ONLY),
    _entry("conventional-deadlift", "Conventional Deadlift", (_H, _G, _LB), (_Q,), (_BB,), P.MOVEMENT_PATTERN_HINGE,
           True),
    _entry("dumbbell-romanian-deadlift", "Dumbbell Romanian Deadlift", (_H, _G), (_LB,), (_DB,),
           P.MOVEMENT_PATTERN_HINGE, True),
    _entry("glute-bridge", "Glute Bridge", (_G,), (_H,), (_BW,), P.MOVEMENT_PATTERN_HINGE, False, REPS_ONLY),
    _entry("bodyweight-lunge", "Bodyweight Lunge", (_Q, _G), (_H,), (_BW,), P.MOVEMENT_PATTERN_LUNGE, True, REPS_ONLY),
    _entry("barbell-bench-press", "Barbell Bench Press", (_C,), (_T, _S), (_BB, _BN),
           P.MOVEMENT_PATTERN_HORIZONTAL_PUSH, True),
    _entry("dumbbell-bench-press", "Dumbbell Bench Press", (_C,), (_T, _S), (_DB, _BN),
           P.MOVEMENT_PATTERN_HORIZONTAL_PUSH, True),
    _entry("push-up", "Push-Up", (_C,), (_T, _S), (_BW,), P.MOVEMENT_PATTERN_HORIZONTAL_PUSH, True, REPS_ONLY),
    _entry("barbell-overhead-press", "Barbell Overhead Press", (_S,), (_T,), (_BB,), P.MOVEMENT_PATTERN_VERTICAL_PUSH,
           True),
    _entry("pike-push-up", "Pike Push-Up", (_S,), (_T,), (_BW,), P.MOVEMENT_PATTERN_VERTICAL_PUSH, True, REPS_ONLY),
    _entry("barbell-bent-over-row", "Barbell Bent-Over Row", (_UB, _L), (_B,), (_BB,),
           P.MOVEMENT_PATTERN_HORIZONTAL_PULL, True),
    _entry("one-arm-dumbbell-row", "One-Arm Dumbbell Row", (_L, _UB), (_B,), (_DB, _BN),
           P.MOVEMENT_PATTERN_HORIZONTAL_PULL, True),
    _entry("pull-up", "Pull-Up", (_L,), (_B, _UB), (_BAR,), P.MOVEMENT_PATTERN_VERTICAL_PULL, True, REPS_ONLY),
    _entry("dumbbell-biceps-curl", "Dumbbell Biceps Curl", (_B,), (), (_DB,), P.MOVEMENT_PATTERN_ISOLATION, False),
    _entry("plank", "Plank", (_AB,), (), (_BW,), P.MOVEMENT_PATTERN_CORE, False,
           workout_pb2.EXERCISE_MEASUREMENT_DURATION),
    _entry("crunch", "Crunch", (_AB,), (), (_BW,), P.MOVEMENT_PATTERN_CORE, False, REPS_ONLY),
    _entry("burpee", "Burpee", (fit.MUSCLE_GROUP_CARDIO,), (_Q, _C), (_BW,), P.MOVEMENT_PATTERN_CARDIO, True,
           REPS_ONLY),
)
