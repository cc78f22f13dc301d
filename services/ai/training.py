"""Training knowledge shared by plans and recommendations: goal profiles, loads, recovery.

Loads follow the Epley formula the workout service uses for its estimated maxima,
``1RM = w * (1 + reps / 30)``, with repetitions in reserve (RIR = 10 - RPE) counted as reps the
lifter could still have done. So a prescription of ``reps`` at ``rpe`` is a load of
``1 / (1 + (reps + 10 - rpe) / 30)`` of the estimated maximum: 5 reps at RPE 8 is 81%.
"""

from __future__ import annotations

from dataclasses import dataclass

from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.user.v1 import user_pb2


@dataclass(frozen=True)
class GoalProfile:
    """How a goal is trained."""

    title: str
    #: Working sets of main (compound) lifts and of accessories.
    main_sets: int
    accessory_sets: int
    #: Reps of main lifts in weeks 1, 2 and 3 of a four-week block; accessories' reps.
    reps: tuple[int, int, int]
    accessory_reps: int
    #: Target RPE of main lifts in weeks 1, 2 and 3 of a block.
    rpe: tuple[float, float, float]
    rest_main: int
    rest_accessory: int
    #: Whether days end with conditioning work.
    conditioning: bool


GOALS: dict[int, GoalProfile] = {
    fit.FITNESS_GOAL_STRENGTH: GoalProfile("strength", 5, 3, (5, 4, 3), 8, (7.5, 8.0, 8.5), 180, 90, False),
    fit.FITNESS_GOAL_HYPERTROPHY: GoalProfile("hypertrophy", 4, 3, (10, 10, 8), 12, (7.0, 7.5, 8.5), 90, 60, False),
    fit.FITNESS_GOAL_ENDURANCE: GoalProfile("endurance", 3, 2, (15, 15, 12), 20, (6.5, 7.0, 7.5), 45, 30, True),
    fit.FITNESS_GOAL_WEIGHT_LOSS: GoalProfile("weight loss", 3, 3, (12, 12, 10), 15, (7.0, 7.5, 8.0), 60, 45, True),
}
#: Users who have not set a goal train for general fitness, which hypertrophy-style work serves best.
DEFAULT_GOAL = fit.FITNESS_GOAL_HYPERTROPHY


def goal_profile(goal: int) -> GoalProfile:
    """The profile of ``goal``, or of the default goal when it is unset."""
    return GOALS.get(goal, GOALS[DEFAULT_GOAL])


#: Set and effort adjustments by training age: beginners recover less and need less to progress.
LEVEL_SET_CHANGE: dict[int, int] = {user_pb2.FITNESS_LEVEL_BEGINNER: -1, user_pb2.FITNESS_LEVEL_ADVANCED: 1}
LEVEL_RPE_CHANGE: dict[int, float] = {user_pb2.FITNESS_LEVEL_BEGINNER: -0.5}


def percent_of_max(reps: int, rpe: float) -> float:
    """The share of the estimated one-rep maximum for ``reps`` at ``rpe`` (Epley with RIR)."""
    return 1.0 / (1.0 + (reps + max(0.0, 10.0 - rpe)) / 30.0)


def rpe_for(reps: int, share_of_max: float) -> float:
    """The RPE a load of ``share_of_max`` for ``reps`` should feel like: the inverse of percent_of_max."""
    reps_possible = 30.0 * (1.0 / share_of_max - 1.0)
    return max(1.0, min(10.0, 10.0 - (reps_possible - reps)))


def epley(weight_kg: float, reps: int) -> float:
    """The estimated one-rep maximum of a set."""
    return weight_kg * (1.0 + reps / 30.0)


#: Hours a muscle group needs between hard sessions: large groups 72, the others 48, conditioning 24.
LARGE_MUSCLES = frozenset({
    fit.MUSCLE_GROUP_QUADRICEPS, fit.MUSCLE_GROUP_HAMSTRINGS, fit.MUSCLE_GROUP_GLUTES, fit.MUSCLE_GROUP_LOWER_BACK,
    fit.MUSCLE_GROUP_LATS, fit.MUSCLE_GROUP_CHEST,
})


def recovery_hours(muscle: int) -> float:
    """How long ``muscle`` needs to recover from a hard session."""
    if muscle == fit.MUSCLE_GROUP_CARDIO:
        return 24.0
    return 72.0 if muscle in LARGE_MUSCLES else 48.0


def muscle_name(muscle: fit.MuscleGroup.ValueType) -> str:
    """A muscle group as a user reads it: "upper back"."""
    return fit.MuscleGroup.Name(muscle).removeprefix("MUSCLE_GROUP_").replace("_", " ").lower()


def equipment_name(equipment: fit.Equipment.ValueType) -> str:
    """Equipment as a user reads it: "pull-up bar"."""
    words = fit.Equipment.Name(equipment).removeprefix("EQUIPMENT_").replace("_", " ").lower()
    return words.replace("pull up", "pull-up")


def join_words(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def format_kg(value: float) -> str:
    """A load without a needless decimal: "100 kg", "102.5 kg"."""
    return f"{value:g} kg"
