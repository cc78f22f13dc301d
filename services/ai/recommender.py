"""The next workout: which muscles, which exercises, and how heavy, from a user's history.

1. Recovery: each muscle group's last hard session (as a primary mover, warm-ups excluded) is
   compared with what it needs: 72 h for large groups, 48 h for the rest, 24 h for conditioning,
   12 h more after a big or very hard session (10+ sets, or a set at RPE 9+).
2. Priority: recovered groups are ranked by rest relative to need (counting no more than twice
   the need: beyond that a group is simply fresh), weighted by the goal (strength and fat loss
   favour the large groups) and by this week's volume shortfall (under 10 sets); groups the
   request asks to favour come first.
3. Exercises: for each group in that order, the best exercise the equipment allows whose primary
   movers have all recovered: one the user has done before (so its load can progress), compound,
   a staple lift; until the time or the exercise limit is reached.
4. Load: the last session of that exercise decides. Every target rep at RPE 8 or less: +2.5% (at
   least one load step); every rep but harder: the same load; a few reps short: the same load,
   aim for all; more than 10% short: 5% lighter. Without a last session, the best estimated
   one-rep maximum gives the load for the goal's reps and RPE; without that, an RPE target.

Every choice carries its reason, so two users with different histories get different workouts
and can see why.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from fittracker.ai.v1 import ai_pb2
from fittracker.common.v1 import fitness_pb2 as fit
from fittracker.user.v1 import user_pb2
from fittracker.workout.v1 import workout_pb2

from services.ai.catalog import CatalogExercise, Equipment, Muscle, round_load, staple_rank
from services.ai.planner import LoggedSet, implement_rank
from services.ai.training import (
    LARGE_MUSCLES,
    LEVEL_RPE_CHANGE,
    LEVEL_SET_CHANGE,
    equipment_name,
    format_kg,
    goal_profile,
    join_words,
    muscle_name,
    percent_of_max,
    recovery_hours,
)
from services.runtime.timeutil import from_timestamp, to_timestamp

#: Rest counts up to this multiple of what a group needs; beyond it the group is simply fresh.
MAX_REST_SHARE = 2.0
WEEKLY_SET_TARGET = 10
#: Seconds a working set takes, besides the rest after it; and the setting up of each exercise.
SET_SECONDS, SETUP_SECONDS = 40, 60
PROGRESSION = 0.025
REDUCTION = 0.05
EASY_ENOUGH_RPE = 8.0
#: Groups ranked by default when nothing else separates them: the big movers first.
_DEFAULT_ORDER: tuple[Muscle, ...] = (
    fit.MUSCLE_GROUP_QUADRICEPS, fit.MUSCLE_GROUP_CHEST, fit.MUSCLE_GROUP_LATS, fit.MUSCLE_GROUP_HAMSTRINGS,
    fit.MUSCLE_GROUP_GLUTES, fit.MUSCLE_GROUP_SHOULDERS, fit.MUSCLE_GROUP_UPPER_BACK, fit.MUSCLE_GROUP_LOWER_BACK,
    fit.MUSCLE_GROUP_TRICEPS, fit.MUSCLE_GROUP_BICEPS, fit.MUSCLE_GROUP_ABDOMINALS, fit.MUSCLE_GROUP_CALVES,
    fit.MUSCLE_GROUP_TRAPS, fit.MUSCLE_GROUP_OBLIQUES, fit.MUSCLE_GROUP_ADDUCTORS, fit.MUSCLE_GROUP_ABDUCTORS,
    fit.MUSCLE_GROUP_FOREARMS,
)
_LARGE_FIRST_GOALS = (fit.FITNESS_GOAL_STRENGTH, fit.FITNESS_GOAL_WEIGHT_LOSS, fit.FITNESS_GOAL_ENDURANCE)


@dataclass(frozen=True)
class UserContext:
    """What the user service says about the user, or defaults when it could not be asked."""

    goal: int = fit.FITNESS_GOAL_UNSPECIFIED
    level: int = user_pb2.FITNESS_LEVEL_UNSPECIFIED
    equipment: frozenset[Equipment] = frozenset()
    time_zone: str = "UTC"
    #: False when the user service could not be reached and these are defaults.
    known: bool = True


@dataclass(frozen=True)
class History:
    """The workout service's view of the user: recent completed sessions and best estimated maxima."""

    sessions: Sequence[workout_pb2.Session]
    maxima: Mapping[str, float]
    days: int


@dataclass
class MuscleState:
    """When a muscle group last worked hard, and how much this week."""

    last: datetime | None = None
    last_sets: int = 0
    last_hard: bool = False
    week_sets: int = 0

    def needs_hours(self, muscle: int) -> float:
        """Recovery needed after the last session, longer after a big or very hard one."""
        extra = 12.0 if self.last_sets >= 10 or self.last_hard else 0.0
        return recovery_hours(muscle) + extra


@dataclass(frozen=True)
class LastPerformance:
    """The working sets of the most recent session that had an exercise, and what it aimed for."""

    when: datetime
    sets: tuple[LoggedSet, ...]
    target_reps: int


@dataclass
class Request:
    """What the caller asked for, resolved."""

    user: str
    minutes: int
    focus: frozenset[Muscle]
    equipment: frozenset[Equipment]
    max_exercises: int | None
    now: datetime
    reasons: list[str] = field(default_factory=list)
    degraded_reasons: list[str] = field(default_factory=list)


class NothingToRecommend(Exception):
    """The catalog has no exercise for the equipment available."""


def muscle_states(sessions: Sequence[workout_pb2.Session], catalog: Mapping[str, CatalogExercise],
                  now: datetime) -> dict[Muscle, MuscleState]:
    """Recovery state per muscle group from completed sessions."""
    states: dict[Muscle, MuscleState] = {}
    for session in sorted(sessions, key=lambda s: s.end_time.ToDatetime()):
        if session.state != workout_pb2.SESSION_STATE_COMPLETED or not session.HasField("end_time"):
            continue
        ended = from_timestamp(session.end_time)
        counts: dict[Muscle, int] = {}
        hard: set[Muscle] = set()
        for s in session.sets:
            exercise = catalog.get(s.exercise)
            if exercise is None or s.set_type == workout_pb2.SET_TYPE_WARMUP:
                continue
            for muscle in exercise.primary:
                counts[muscle] = counts.get(muscle, 0) + 1
                if s.HasField("rpe") and s.rpe >= 9:
                    hard.add(muscle)
        for muscle, count in counts.items():
            state = states.setdefault(muscle, MuscleState())
            state.last, state.last_sets, state.last_hard = ended, count, muscle in hard
            if (now - ended).total_seconds() <= 7 * 24 * 3600:
                state.week_sets += count
    return states


def last_performances(sessions: Sequence[workout_pb2.Session]) -> dict[str, LastPerformance]:
    """The latest working sets of each exercise."""
    result: dict[str, LastPerformance] = {}
    for session in sorted(sessions, key=lambda s: s.end_time.ToDatetime(), reverse=True):
        if session.state != workout_pb2.SESSION_STATE_COMPLETED:
            continue
        planned = {p.exercise: p.target_reps for p in session.planned_exercises}
        by_exercise: dict[str, list[LoggedSet]] = {}
        for s in session.sets:
            if s.set_type == workout_pb2.SET_TYPE_WARMUP or s.reps <= 0:
                continue
            by_exercise.setdefault(s.exercise, []).append(
                LoggedSet(s.reps, s.weight_kg, s.rpe if s.HasField("rpe") else None)
            )
        for name, sets in by_exercise.items():
            if name not in result:
                result[name] = LastPerformance(from_timestamp(session.end_time), tuple(sets), planned.get(name, 0))
    return result


def _hours(since: datetime | None, now: datetime) -> float | None:
    return None if since is None else max(0.0, (now - since).total_seconds() / 3600)


def _rested(hours: float) -> str:
    if hours >= 48:
        return f"{hours / 24:.0f} days"
    return f"{hours:.0f} hours"


def recommend(request: Request, context: UserContext, history: History | None,
              catalog: Sequence[CatalogExercise]) -> ai_pb2.Recommendation:
    """Build the recommendation; ``history`` None means the workout history could not be read."""
    goal = goal_profile(context.goal)
    usable = [e for e in catalog if e.usable_with(request.equipment)]
    if not usable:
        raise NothingToRecommend
    index = {e.name: e for e in catalog}
    states = muscle_states(history.sessions, index, request.now) if history else {}
    performances = last_performances(history.sessions) if history else {}
    maxima = history.maxima if history else {}
    recovered, resting = _split_by_recovery(states, request.now)
    order = _priorities(recovered, states, request, context)
    limit = request.max_exercises or max(2, min(8, request.minutes // 10))
    chosen: list[tuple[CatalogExercise, ai_pb2.RecommendedExercise, float]] = []
    budget = request.minutes * 60.0
    for muscle in order:
        if len(chosen) >= limit:
            break
        if any(muscle in e.primary for e, _, _ in chosen):
            continue
        candidates = [e for e in usable if muscle in e.primary and not (e.primary & resting)
                      and all(e.name != c.name for c, _, _ in chosen)]
        if not candidates:
            continue
        candidates.sort(key=lambda e: (e.name not in performances, not e.compound, staple_rank(e.name),
                                       implement_rank(e, context.goal), e.display_name))
        exercise = candidates[0]
        prescription = _prescribe(exercise, context, performances.get(exercise.name), maxima.get(exercise.name))
        seconds = prescription.sets * (SET_SECONDS + prescription.rest_seconds) + SETUP_SECONDS
        if seconds > budget:
            continue
        budget -= seconds
        prescription.reasons.insert(0, _why_exercise(exercise, states, request.now, muscle))
        chosen.append((exercise, prescription, seconds))
    if not chosen:
        chosen = _recovery_day(usable, resting, context, request)
    chosen.sort(key=lambda c: (not c[0].compound, -c[1].sets))
    recommendation = ai_pb2.Recommendation(
        user=request.user,
        exercises=[p for _, p, _ in chosen],
        focus_muscle_groups=_focus(chosen),
        estimated_duration_minutes=max(1, math.ceil(sum(s for _, _, s in chosen) / 60)),
        generate_time=to_timestamp(request.now),
    )
    recommendation.reasons.extend(_overall_reasons(request, context, history, states, resting, chosen, goal.title))
    if request.degraded_reasons:
        recommendation.degraded = True
        recommendation.degraded_reason = " ".join(request.degraded_reasons)
    return recommendation


def _split_by_recovery(states: Mapping[Muscle, MuscleState], now: datetime) -> tuple[set[Muscle], frozenset[Muscle]]:
    recovered: set[Muscle] = set()
    resting: set[Muscle] = set()
    for muscle in _DEFAULT_ORDER:
        state = states.get(muscle)
        hours = _hours(state.last if state else None, now)
        if state is None or hours is None or hours >= state.needs_hours(muscle):
            recovered.add(muscle)
        else:
            resting.add(muscle)
    return recovered, frozenset(resting)


def _priorities(recovered: set[Muscle], states: Mapping[Muscle, MuscleState], request: Request,
                context: UserContext) -> list[Muscle]:
    def score(muscle: Muscle) -> float:
        state = states.get(muscle, MuscleState())
        hours = _hours(state.last, request.now)
        need = state.needs_hours(muscle)
        value = MAX_REST_SHARE if hours is None else min(MAX_REST_SHARE, hours / need)
        if context.goal in _LARGE_FIRST_GOALS:
            value *= 1.2 if muscle in LARGE_MUSCLES else 0.6
        elif muscle not in LARGE_MUSCLES:
            value *= 0.8
        return value * (1 + max(0, WEEKLY_SET_TARGET - state.week_sets) / (2 * WEEKLY_SET_TARGET))

    return sorted(recovered, key=lambda m: (m not in request.focus, -score(m), _DEFAULT_ORDER.index(m)))


def _prescribe(exercise: CatalogExercise, context: UserContext, last: LastPerformance | None,
               maximum: float | None) -> ai_pb2.RecommendedExercise:
    goal = goal_profile(context.goal)
    main = exercise.compound
    sets = (goal.main_sets + LEVEL_SET_CHANGE.get(context.level, 0)) if main else goal.accessory_sets
    reps = goal.reps[0] if main else goal.accessory_reps
    rpe = goal.rpe[0] + LEVEL_RPE_CHANGE.get(context.level, 0.0)
    rest = goal.rest_main if main else goal.rest_accessory
    out = ai_pb2.RecommendedExercise(exercise=exercise.name, display_name=exercise.display_name, sets=max(1, sets),
                                     reps=reps if exercise.counts_reps else 0, rest_seconds=rest, target_rpe=rpe)
    if not exercise.counts_reps:
        out.reasons.append(f"Hold each set at RPE {rpe:g}: hard, with a little left in reserve.")
        return out
    if last is not None:
        _progress(exercise, last, out)
    elif exercise.loadable and maximum:
        out.weight_kg = round_load(percent_of_max(reps, rpe) * maximum, exercise.load_step())
        out.reasons.append(
            f"Your best estimated one-rep maximum is {format_kg(round(maximum, 1))}, so {reps} reps at RPE {rpe:g} "
            f"is about {format_kg(out.weight_kg)}."
        )
    else:
        out.reasons.append(
            f"No history for this exercise yet: pick a load you could lift {10 - rpe:g} more times (RPE {rpe:g})."
        )
    return out


def _progress(exercise: CatalogExercise, last: LastPerformance, out: ai_pb2.RecommendedExercise) -> None:
    """Progressive overload from the last session of the exercise."""
    target = last.target_reps or last.sets[0].reps
    top = max(s.weight_kg for s in last.sets)
    at_top = [s for s in last.sets if s.weight_kg >= top]
    rpes = [s.rpe for s in last.sets if s.rpe is not None]
    hardest = max(rpes) if rpes else None
    effort = f" with RPE {hardest:g}" if hardest is not None else ""
    done = sum(min(s.reps, target) for s in at_top)
    wanted = len(at_top) * target
    all_hit = done >= wanted
    out.sets = max(out.sets, len(at_top)) if exercise.loadable else out.sets
    out.reps = target
    if hardest is not None:
        out.target_rpe = min(out.target_rpe, EASY_ENOUGH_RPE)
    loaded = exercise.loadable and top > 0
    did = f"You did {len(at_top)}x{target}" + (f" at {format_kg(top)}" if loaded else "")
    if all_hit and (hardest is None or hardest <= EASY_ENOUGH_RPE):
        if loaded:
            step = exercise.load_step()
            out.weight_kg = max(top + step, round_load(top * (1 + PROGRESSION), step))
            out.reasons.append(f"{did}{effort} last time, so the load goes up by {format_kg(out.weight_kg - top)}.")
        else:
            out.reps = target + 1
            out.weight_kg = top
            out.reasons.append(f"{did}{effort} last time, so aim for one more rep per set.")
    elif all_hit:
        out.weight_kg = top
        out.reasons.append(f"{did}{effort} last time, so repeat it until it feels easier.")
    elif done >= 0.9 * wanted:
        out.weight_kg = top
        out.reasons.append(
            f"You got {done} of {wanted} reps" + (f" at {format_kg(top)}" if loaded else "")
            + " last time, so repeat it and aim for every rep."
        )
    elif loaded:
        out.weight_kg = round_load(top * (1 - REDUCTION), exercise.load_step())
        out.reasons.append(
            f"You got {done} of {wanted} reps at {format_kg(top)} last time, so the load drops by 5% to "
            f"{format_kg(out.weight_kg)}."
        )
    else:
        out.reps = max(1, math.ceil(done / max(1, len(at_top))))
        out.reasons.append(f"You got {done} of {wanted} reps last time, so aim for {out.reps} per set.")


def _why_exercise(exercise: CatalogExercise, states: Mapping[Muscle, MuscleState], now: datetime,
                  muscle: Muscle) -> str:
    trained = join_words([muscle_name(m) for m in sorted(exercise.primary, key=_DEFAULT_ORDER.index)])
    state = states.get(muscle)
    hours = _hours(state.last if state else None, now)
    if hours is None:
        return f"It trains your {trained}, which you have not trained recently."
    return f"It trains your {trained}; your {muscle_name(muscle)} have rested for {_rested(hours)}."


def _recovery_day(usable: Sequence[CatalogExercise], resting: frozenset[Muscle], context: UserContext,
                  request: Request) -> list[tuple[CatalogExercise, ai_pb2.RecommendedExercise, float]]:
    """Everything is still recovering (or nothing fits): light conditioning and core work."""
    light = [e for e in usable if e.pattern in (fit.MOVEMENT_PATTERN_CARDIO, fit.MOVEMENT_PATTERN_CORE)
             and not (e.primary & resting)] or list(usable)
    light.sort(key=lambda e: (staple_rank(e.name), e.display_name))
    chosen = []
    for exercise in light[:2]:
        out = _prescribe(exercise, context, None, None)
        out.target_rpe = 6.0
        out.sets = min(out.sets, 3)
        out.reasons.insert(0, "Your main muscle groups are still recovering, so today is light work.")
        chosen.append((exercise, out, float(out.sets * (SET_SECONDS + out.rest_seconds) + SETUP_SECONDS)))
    request.reasons.append("Every muscle group you train is still recovering, so this is a light session.")
    return chosen


def _focus(chosen: Sequence[tuple[CatalogExercise, ai_pb2.RecommendedExercise, float]]) -> list[Muscle]:
    sets: dict[Muscle, int] = {}
    for exercise, prescription, _ in chosen:
        for muscle in exercise.primary:
            sets[muscle] = sets.get(muscle, 0) + prescription.sets
    return sorted(sets, key=lambda m: (-sets[m], m))


def _overall_reasons(request: Request, context: UserContext, history: History | None,
                     states: Mapping[Muscle, MuscleState], resting: frozenset[Muscle],
                     chosen: Sequence[tuple[CatalogExercise, ai_pb2.RecommendedExercise, float]],
                     goal_title: str) -> list[str]:
    goal = goal_profile(context.goal)
    reasons = []
    if not context.known:
        reasons.append(f"Your goal could not be read, so the workout trains for general fitness ({goal_title} "
                       "ranges).")
    elif context.goal == fit.FITNESS_GOAL_UNSPECIFIED:
        reasons.append(f"You have not set a goal, so the workout trains for general fitness ({goal_title} ranges).")
    else:
        reasons.append(
            f"Your goal is {goal_title}, so main lifts are {goal.reps[0]} reps at about RPE {goal.rpe[0]:g} "
            f"with {goal.rest_main} s rests."
        )
    trained = {m for e, _, _ in chosen for m in e.primary}
    rested: dict[str, list[str]] = {}
    fresh: list[str] = []
    for muscle in sorted(trained, key=_DEFAULT_ORDER.index) if trained else []:
        if muscle == fit.MUSCLE_GROUP_CARDIO:
            continue
        state = states.get(muscle)
        hours = _hours(state.last if state else None, request.now)
        if hours is None:
            fresh.append(muscle_name(muscle))
        else:
            rested.setdefault(_rested(hours), []).append(muscle_name(muscle))
    for span, names in rested.items():
        reasons.append(f"Your {join_words(names)} have rested for {span}.")
    if fresh and history is not None and history.sessions:
        reasons.append(f"Your {join_words(fresh)} have not been trained in the last {history.days} days.")
    for muscle in sorted(resting, key=_DEFAULT_ORDER.index):
        state = states[muscle]
        hours = _hours(state.last, request.now) or 0.0
        asked = "You asked for your " if muscle in request.focus else "Your "
        reasons.append(
            f"{asked}{muscle_name(muscle)} trained {_rested(hours)} ago and need about "
            f"{state.needs_hours(muscle):.0f} hours to recover, so they are left out today."
        )
    if history is not None and not history.sessions:
        reasons.append(f"You have no completed workouts in the last {history.days} days, so this starts with the "
                       "basics.")
    kit = sorted(request.equipment - {fit.EQUIPMENT_BODYWEIGHT})
    reasons.append(
        "Only body-weight exercises, since no equipment is listed." if not kit
        else f"Only exercises for your equipment: {join_words([equipment_name(e) for e in kit])}."
    )
    return reasons + request.reasons
