"""Training plans: a periodised design from a goal, and its adaptation to the sessions logged.

Design (``design_weeks``):

- The split follows the days per week: full body for 1-3 days, upper/lower for 4, upper/lower
  plus push/pull/legs for 5, push/pull/legs twice for 6, and a conditioning day added for 7.
  Days that repeat a template are made heavy and light (daily undulation) when the week has 4+ days.
- Weeks come in blocks of four: two accumulation weeks (the second with an extra set on main
  lifts), an intensification week (fewer reps, higher effort) and a deload week (60% of the sets
  at RPE 6). A plan of six weeks or more also ends on a deload. Each new block raises the effort
  half an RPE point: linear progression from block to block.
- Reps and effort come from the goal (training.GOALS) and the level. Loads are percentages of the
  user's estimated one-rep maximum where the workout service knows one (Epley with reps in
  reserve, training.percent_of_max); otherwise the prescription is an RPE target.
- Exercises come from the catalog, filtered by the equipment available, by movement pattern:
  compound lifts the user has a maximum for first, then by the goal's preferred implements.

Adaptation (``adapt``) compares each past, not yet judged plan day with the completed session
matched to it (same week, most exercises in common, nearest date) and changes the days ahead,
each change with its reason; see ``adapt`` for the rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta

from fittracker.ai.v1 import ai_pb2
from fittracker.common.v1 import fitness_pb2 as fit

from services.ai.catalog import CatalogExercise, Equipment, round_load, staple_rank
from services.ai.training import (
    LEVEL_RPE_CHANGE,
    LEVEL_SET_CHANGE,
    goal_profile,
    join_words,
    percent_of_max,
    rpe_for,
)

ACCUMULATION, INTENSIFICATION, DELOAD = (
    ai_pb2.WEEK_KIND_ACCUMULATION, ai_pb2.WEEK_KIND_INTENSIFICATION, ai_pb2.WEEK_KIND_DELOAD,
)
MAIN, ACCESSORY, CONDITIONING = "main", "accessory", "conditioning"
DELOAD_SET_SHARE = 0.6
DELOAD_RPE = 6.0
MAX_RPE = 9.5
MIN_RPE = 5.0
#: Days with fewer exercises than this (for want of equipment) get core or conditioning work added.
MIN_EXERCISES_PER_DAY = 3


@dataclass(frozen=True)
class Slot:
    """One exercise position of a day template."""

    patterns: tuple[int, ...]
    role: str = MAIN
    #: For isolation and core slots: the muscle groups wanted as primary movers.
    muscles: tuple[int, ...] = ()
    #: Take the n-th best candidate, so that days sharing a pattern use different exercises.
    variant: int = 0


@dataclass(frozen=True)
class DayTemplate:
    """What one training day works."""

    focus: str
    slots: tuple[Slot, ...]


_M = fit
_SQUAT, _HINGE, _LUNGE = _M.MOVEMENT_PATTERN_SQUAT, _M.MOVEMENT_PATTERN_HINGE, _M.MOVEMENT_PATTERN_LUNGE
_HPUSH, _VPUSH = _M.MOVEMENT_PATTERN_HORIZONTAL_PUSH, _M.MOVEMENT_PATTERN_VERTICAL_PUSH
_HPULL, _VPULL = _M.MOVEMENT_PATTERN_HORIZONTAL_PULL, _M.MOVEMENT_PATTERN_VERTICAL_PULL
_ISO, _CORE, _CARRY, _CARDIO = (
    _M.MOVEMENT_PATTERN_ISOLATION, _M.MOVEMENT_PATTERN_CORE, _M.MOVEMENT_PATTERN_CARRY, _M.MOVEMENT_PATTERN_CARDIO,
)


def _iso(*muscles: int, variant: int = 0) -> Slot:
    return Slot((_ISO,), ACCESSORY, muscles, variant)


_CORE_SLOT = Slot((_CORE,), ACCESSORY, (_M.MUSCLE_GROUP_ABDOMINALS, _M.MUSCLE_GROUP_OBLIQUES))
FULL_A = DayTemplate("Full body A", (
    Slot((_SQUAT,)), Slot((_HPUSH,)), Slot((_HPULL, _VPULL)), Slot((_HINGE,), ACCESSORY, variant=1), _CORE_SLOT,
))
FULL_B = DayTemplate("Full body B", (
    Slot((_HINGE,)), Slot((_VPUSH, _HPUSH)), Slot((_VPULL, _HPULL)), Slot((_LUNGE, _SQUAT), ACCESSORY), _CORE_SLOT,
))
FULL_C = DayTemplate("Full body C", (
    Slot((_SQUAT,), variant=1), Slot((_HPUSH,), variant=1), Slot((_HPULL, _VPULL), variant=1),
    _iso(_M.MUSCLE_GROUP_BICEPS), _iso(_M.MUSCLE_GROUP_TRICEPS), Slot((_CARRY, _CORE), ACCESSORY),
))
UPPER = DayTemplate("Upper body", (
    Slot((_HPUSH,)), Slot((_HPULL,)), Slot((_VPUSH,), ACCESSORY), Slot((_VPULL,), ACCESSORY),
    _iso(_M.MUSCLE_GROUP_BICEPS), _iso(_M.MUSCLE_GROUP_TRICEPS),
))
LOWER = DayTemplate("Lower body", (
    Slot((_SQUAT,)), Slot((_HINGE,)), Slot((_LUNGE,), ACCESSORY), _iso(_M.MUSCLE_GROUP_HAMSTRINGS),
    _iso(_M.MUSCLE_GROUP_CALVES), _CORE_SLOT,
))
PUSH = DayTemplate("Push", (
    Slot((_HPUSH,)), Slot((_VPUSH,)), Slot((_HPUSH,), ACCESSORY, variant=1), _iso(_M.MUSCLE_GROUP_SHOULDERS),
    _iso(_M.MUSCLE_GROUP_TRICEPS),
))
PULL = DayTemplate("Pull", (
    Slot((_VPULL,)), Slot((_HPULL,)), Slot((_HINGE,), ACCESSORY, variant=1), _iso(_M.MUSCLE_GROUP_UPPER_BACK),
    _iso(_M.MUSCLE_GROUP_BICEPS),
))
LEGS = DayTemplate("Legs", (
    Slot((_SQUAT,)), Slot((_HINGE,), variant=1), Slot((_LUNGE,), ACCESSORY), _iso(_M.MUSCLE_GROUP_QUADRICEPS),
    _iso(_M.MUSCLE_GROUP_CALVES), _CORE_SLOT,
))
CONDITIONING_DAY = DayTemplate("Conditioning", (
    Slot((_CARDIO,), CONDITIONING), Slot((_CARRY,), ACCESSORY), _CORE_SLOT,
))

SPLITS: dict[int, tuple[DayTemplate, ...]] = {
    1: (FULL_A,),
    2: (FULL_A, FULL_B),
    3: (FULL_A, FULL_B, FULL_C),
    4: (UPPER, LOWER, UPPER, LOWER),
    5: (UPPER, LOWER, PUSH, PULL, LEGS),
    6: (PUSH, PULL, LEGS, PUSH, PULL, LEGS),
    7: (PUSH, PULL, LEGS, PUSH, PULL, LEGS, CONDITIONING_DAY),
}
#: Which days of the week (0 = the plan's first day) train, spread to leave rest between.
DAY_OFFSETS: dict[int, tuple[int, ...]] = {
    1: (0,), 2: (0, 3), 3: (0, 2, 4), 4: (0, 1, 3, 4), 5: (0, 1, 2, 4, 5), 6: (0, 1, 2, 3, 4, 5),
    7: (0, 1, 2, 3, 4, 5, 6),
}
#: Preferred implements by goal (lower is better): strength wants barbells, others dumbbells first.
_IMPLEMENT_RANK: dict[int, tuple[int, ...]] = {
    fit.FITNESS_GOAL_STRENGTH: (fit.EQUIPMENT_BARBELL, fit.EQUIPMENT_DUMBBELL, fit.EQUIPMENT_MACHINE,
                                fit.EQUIPMENT_KETTLEBELL, fit.EQUIPMENT_CABLE),
}
_DEFAULT_IMPLEMENTS = (fit.EQUIPMENT_DUMBBELL, fit.EQUIPMENT_BARBELL, fit.EQUIPMENT_MACHINE, fit.EQUIPMENT_CABLE,
                       fit.EQUIPMENT_KETTLEBELL, fit.EQUIPMENT_CARDIO_MACHINE)


def week_kind(week: int, week_count: int) -> ai_pb2.WeekKind.ValueType:
    """Accumulation, intensification or deload for week ``week`` (from 1) of a plan."""
    if week % 4 == 0 or (week_count >= 6 and week == week_count):
        return DELOAD
    return INTENSIFICATION if (week - 1) % 4 == 2 else ACCUMULATION


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is designed from."""

    goal: int
    level: int
    days_per_week: int
    week_count: int
    start: date
    equipment: frozenset[Equipment]
    catalog: Sequence[CatalogExercise]
    #: Estimated one-rep maxima in kilograms by exercise name.
    maxima: Mapping[str, float] = field(default_factory=dict)


class NoExercises(Exception):
    """The catalog has nothing for the equipment available."""


def design_weeks(inputs: PlanInputs) -> list[ai_pb2.PlanWeek]:
    """The weeks of a new plan."""
    usable = [e for e in inputs.catalog if e.usable_with(inputs.equipment)]
    templates = SPLITS[inputs.days_per_week]
    days: list[tuple[DayTemplate, str, list[tuple[CatalogExercise, str]]]] = []
    seen: dict[DayTemplate, int] = {}
    for template in templates:
        repeat = seen.get(template, 0)
        seen[template] = repeat + 1
        style = "standard"
        if templates.count(template) > 1 and inputs.days_per_week >= 4:
            style = "heavy" if repeat == 0 else "light"
        days.append((template, style, _choose_exercises(template, repeat, usable, inputs)))
    if not any(chosen for _, _, chosen in days):
        raise NoExercises
    weeks = []
    for week in range(1, inputs.week_count + 1):
        kind = week_kind(week, inputs.week_count)
        plan_week = ai_pb2.PlanWeek(week_number=week, kind=kind)
        for number, (template, style, chosen) in enumerate(days, start=1):
            focus = template.focus + {"heavy": ", heavy", "light": ", light"}.get(style, "")
            if kind == DELOAD:
                focus += " (deload)"
            day = plan_week.days.add(
                day_number=number,
                date=(inputs.start + timedelta(days=7 * (week - 1) + DAY_OFFSETS[inputs.days_per_week][number - 1]))
                .isoformat(),
                focus=focus,
            )
            for exercise, role in chosen:
                day.exercises.append(prescribe(exercise, role, week, kind, style, inputs))
        weeks.append(plan_week)
    return weeks


def _choose_exercises(template: DayTemplate, repeat: int, usable: Sequence[CatalogExercise],
                      inputs: PlanInputs) -> list[tuple[CatalogExercise, str]]:
    chosen: list[tuple[CatalogExercise, str]] = []
    used: set[str] = set()
    slots = list(template.slots)
    if goal_profile(inputs.goal).conditioning and template is not CONDITIONING_DAY:
        slots.append(Slot((_CARDIO,), CONDITIONING))
    for slot in slots:
        _fill(slot, repeat, usable, inputs, chosen, used)
    # With little equipment whole patterns vanish (no pulling without a bar): top short days up.
    for slot in (_CORE_SLOT, Slot((_CARDIO,), CONDITIONING), Slot((_CARRY,), ACCESSORY)):
        if len(chosen) >= MIN_EXERCISES_PER_DAY:
            break
        _fill(slot, repeat, usable, inputs, chosen, used)
    return chosen


def _fill(slot: Slot, repeat: int, usable: Sequence[CatalogExercise], inputs: PlanInputs,
          chosen: list[tuple[CatalogExercise, str]], used: set[str]) -> None:
    """Add the best unused exercise for ``slot``, if there is one."""
    candidates: list[CatalogExercise] = []
    for pattern in slot.patterns:
        candidates = [e for e in usable if e.pattern == pattern and e.name not in used
                      and (not slot.muscles or e.primary & set(slot.muscles))]
        if candidates:
            break
    if not candidates and slot.muscles:
        candidates = [e for e in usable if e.primary & set(slot.muscles) and e.name not in used]
    if not candidates:
        return
    candidates.sort(key=lambda e: _rank(e, slot.role, inputs))
    pick = candidates[min(slot.variant + repeat, len(candidates) - 1)]
    used.add(pick.name)
    chosen.append((pick, slot.role))


def _rank(exercise: CatalogExercise, role: str, inputs: PlanInputs) -> tuple[bool, bool, int, int, bool, str]:
    return (
        exercise.name not in inputs.maxima,
        role == MAIN and not exercise.compound,
        staple_rank(exercise.name),
        implement_rank(exercise, inputs.goal),
        not exercise.counts_reps,
        exercise.display_name,
    )


def implement_rank(exercise: CatalogExercise, goal: int) -> int:
    """How much ``goal`` favours the exercise's implement (0 best; body weight last)."""
    implements = _IMPLEMENT_RANK.get(goal, _DEFAULT_IMPLEMENTS)
    return min((implements.index(e) for e in exercise.equipment if e in implements), default=len(implements))


def prescribe(exercise: CatalogExercise, role: str, week: int, kind: int, style: str,
              inputs: PlanInputs) -> ai_pb2.PrescribedExercise:
    """The prescription of ``exercise`` in one day of week ``week``."""
    goal = goal_profile(inputs.goal)
    # A deload keeps the first week's reps: lighter loads as well as fewer sets.
    position = 0 if kind == DELOAD else min(2, (week - 1) % 4)
    block = (week - 1) // 4
    if role == CONDITIONING:
        sets, reps, rpe, rest = (3, 15, 7.0, 30) if exercise.counts_reps else (1, 0, 7.0, 0)
    elif role == MAIN:
        sets = goal.main_sets + LEVEL_SET_CHANGE.get(inputs.level, 0) + (1 if position == 1 else 0)
        reps, rpe, rest = goal.reps[position], goal.rpe[position], goal.rest_main
    else:
        sets, reps, rpe, rest = goal.accessory_sets, goal.accessory_reps, goal.rpe[position], goal.rest_accessory
    if style == "heavy":
        reps, rpe = max(3, reps - 2), rpe + 0.5
    elif style == "light":
        reps, rpe = reps + 2, rpe - 0.5
    rpe += 0.5 * block + LEVEL_RPE_CHANGE.get(inputs.level, 0.0)
    if kind == DELOAD:
        sets, rpe = max(1, round(sets * DELOAD_SET_SHARE)), DELOAD_RPE
    if not exercise.counts_reps:
        reps = 0
    rpe = min(MAX_RPE, max(MIN_RPE, rpe))
    prescription = ai_pb2.PrescribedExercise(exercise=exercise.name, sets=max(1, sets), reps=reps, rest_seconds=rest)
    maximum = inputs.maxima.get(exercise.name, 0.0)
    if exercise.loadable and reps > 0 and maximum > 0:
        share = percent_of_max(reps, rpe)
        prescription.percent_one_rep_max = round(share * 100, 1)
        prescription.weight_kg = round_load(share * maximum, exercise.load_step())
    else:
        prescription.target_rpe = rpe
    return prescription


# --- adaptation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedSet:
    """One working set as logged."""

    reps: int
    weight_kg: float
    rpe: float | None


@dataclass(frozen=True)
class SessionLog:
    """A completed session: its name, the local date it was done on, and its working sets."""

    name: str
    day: date
    sets: Mapping[str, Sequence[LoggedSet]]


@dataclass
class Adaptation:
    """What ``adapt`` changed."""

    changes: list[ai_pb2.PlanChange] = field(default_factory=list)
    #: Day keys ("week:day") judged by this adaptation.
    assessed: list[str] = field(default_factory=list)


SHORTFALL, TOO_HARD, EASY, ON_TARGET, SKIPPED = "shortfall", "too_hard", "easy", "on_target", "skipped"
#: Completion under this share of the prescribed reps is a shortfall.
SHORTFALL_BELOW = 0.9


@dataclass(frozen=True)
class Outcome:
    """How one prescribed exercise went."""

    kind: str
    exercise: str
    week: int
    day: int
    session: str
    detail: str


def day_key(week: int, day: int) -> str:
    """The key of a plan day in the assessed list."""
    return f"{week}:{day}"


def target_rpe_of(p: ai_pb2.PrescribedExercise) -> float:
    """The effort a prescription aims at: its RPE target, or the RPE its load implies."""
    if p.WhichOneof("intensity") == "target_rpe":
        return p.target_rpe
    if p.WhichOneof("intensity") == "percent_one_rep_max" and p.reps > 0:
        return rpe_for(p.reps, p.percent_one_rep_max / 100)
    return 8.0


def judge_exercise(p: ai_pb2.PrescribedExercise, sets: Sequence[LoggedSet]) -> tuple[str, str]:
    """(outcome, the figures behind it in words) of a prescription against the sets done."""
    if not sets:
        return SKIPPED, "did not do it"
    wanted = max(1, p.sets)
    counted = list(sets[:wanted])
    target = target_rpe_of(p)
    rpes = [s.rpe for s in sets if s.rpe is not None]
    effort = sum(rpes) / len(rpes) if rpes else None
    if p.reps > 0:
        def credit(s: LoggedSet) -> float:
            # A set at a lighter load than prescribed earns reps in proportion to the load.
            share = min(1.0, s.weight_kg / p.weight_kg) if p.weight_kg > 0 else 1.0
            return min(s.reps, p.reps) * share

        done = sum(credit(s) for s in counted)
        completion = done / (wanted * p.reps)
        figures = f"did {sum(min(s.reps, p.reps) for s in counted)} of {wanted * p.reps} reps"
        exceeded = len(counted) == wanted and all(s.reps >= p.reps + 2 for s in counted)
    else:
        completion = len(counted) / wanted
        figures = f"did {len(counted)} of {wanted} sets"
        exceeded = False
    if completion < SHORTFALL_BELOW:
        return SHORTFALL, figures
    if effort is not None and effort >= target + 1:
        return TOO_HARD, f"{figures} at RPE {effort:g} against a target of {target:g}"
    if completion >= 1.0 and ((effort is not None and effort <= target - 1.5) or exceeded):
        how = f"at RPE {effort:g} against a target of {target:g}" if effort is not None else "with reps to spare"
        return EASY, f"{figures} {how}"
    return ON_TARGET, figures


def adapt(plan: ai_pb2.Plan, sessions: Sequence[SessionLog], assessed: set[str], today: date,
          names: Mapping[str, str], steps: Mapping[str, float]) -> Adaptation:
    """Adapt ``plan`` in place to ``sessions``; ``names``/``steps`` give exercises' titles and load steps.

    Rules, applied to days before ``today`` not yet in ``assessed``:

    1. Each such day is matched to an unmatched completed session of the same week (most
       exercises in common, then the nearest date); a day without one is missed.
    2. Each prescription of a matched day is judged: under 90% of the prescribed reps (a lighter
       load earns reps in proportion) is a shortfall; mean RPE a point or more over target is too
       hard; every rep with RPE 1.5 under target, or 2+ reps over target in every set, is easy.
    3. Half or more of a week's days missed: the next week, if it has not started and is not a
       deload, repeats the missed week's prescriptions before progressing.
    4. Fatigue: three shortfalls or too-hard exercises, or two in different sessions, turn the next
       week that has not started into a deload (unless it is one already).
    5. For each exercise, its latest outcome changes its later prescriptions (not those of a week
       just turned into a deload): shortfall -5 points of 1RM (or -1 RPE), too hard -2.5 points
       (-0.5 RPE), easy +2.5 points (+0.5 RPE) — progressing sooner than planned.
    """
    result = Adaptation()
    taken = {d.session for w in plan.weeks for d in w.days if d.session}
    pool = [s for s in sessions if s.name not in taken]
    outcomes: list[Outcome] = []
    missed_by_week: dict[int, list[int]] = {}
    for week in plan.weeks:
        for day in week.days:
            key = day_key(week.week_number, day.day_number)
            if key in assessed or date.fromisoformat(day.date) >= today:
                continue
            result.assessed.append(key)
            session = _match(day, week, plan, pool)
            if session is None:
                missed_by_week.setdefault(week.week_number, []).append(day.day_number)
                continue
            pool.remove(session)
            day.session = session.name
            for p in day.exercises:
                kind, detail = judge_exercise(p, session.sets.get(p.exercise, ()))
                outcomes.append(Outcome(kind, p.exercise, week.week_number, day.day_number, session.name, detail))
    done = assessed | set(result.assessed)
    upcoming = [w for w in plan.weeks if all(day_key(w.week_number, d.day_number) not in done
                                             and date.fromisoformat(d.date) >= today for d in w.days)]
    deloaded = _fatigue_deload(plan, outcomes, upcoming, names, result)
    _repeat_missed_weeks(plan, missed_by_week, upcoming, deloaded, result)
    latest: dict[str, Outcome] = {}
    for outcome in outcomes:
        latest[outcome.exercise] = outcome
    for outcome in latest.values():
        if outcome.kind in (SHORTFALL, TOO_HARD, EASY):
            _change_load(plan, outcome, done, today, deloaded, names, steps, result)
    return result


def _match(day: ai_pb2.PlanDay, week: ai_pb2.PlanWeek, plan: ai_pb2.Plan,
           pool: Sequence[SessionLog]) -> SessionLog | None:
    # Plan weeks are the seven days from the plan's first day on, whatever weekday that is.
    week_start = date.fromisoformat(plan.weeks[0].days[0].date) + timedelta(days=7 * (week.week_number - 1))
    planned = date.fromisoformat(day.date)
    wanted = {p.exercise for p in day.exercises}
    best: tuple[int, int] | None = None
    chosen = None
    for session in pool:
        if not week_start <= session.day < week_start + timedelta(days=7):
            continue
        overlap = len(wanted & set(session.sets))
        if overlap == 0 and session.day != planned:
            continue
        score = (overlap, -abs((session.day - planned).days))
        if best is None or score > best:
            best, chosen = score, session
    return chosen


def _fatigue_deload(plan: ai_pb2.Plan, outcomes: Sequence[Outcome], upcoming: Sequence[ai_pb2.PlanWeek],
                    names: Mapping[str, str], result: Adaptation) -> set[int]:
    bad = [o for o in outcomes if o.kind in (SHORTFALL, TOO_HARD)]
    if not (len(bad) >= 3 or (len(bad) >= 2 and len({o.session for o in bad}) >= 2)):
        return set()
    target = next((w for w in upcoming), None)
    if target is None or target.kind == DELOAD:
        return set()
    target.kind = DELOAD
    for day in target.days:
        day.focus = day.focus + " (deload)"
        for p in day.exercises:
            sets = max(1, round(p.sets * DELOAD_SET_SHARE))
            p.sets = sets
            if p.WhichOneof("intensity") == "percent_one_rep_max":
                new = max(40.0, p.percent_one_rep_max - 10.0)
                if p.weight_kg > 0:
                    p.weight_kg = round(p.weight_kg * new / p.percent_one_rep_max * 2) / 2
                p.percent_one_rep_max = new
            else:
                p.target_rpe = DELOAD_RPE
    lifts = join_words(sorted({names.get(o.exercise, o.exercise) for o in bad}))
    result.changes.append(ai_pb2.PlanChange(
        week_number=target.week_number, kind=ai_pb2.PLAN_CHANGE_KIND_DELOAD_INSERTED,
        explanation=f"{len(bad)} exercises fell short or felt too hard in your last sessions ({lifts}), so week "
        f"{target.week_number} becomes a deload week to recover before you progress.",
    ))
    return {target.week_number}


def _repeat_missed_weeks(plan: ai_pb2.Plan, missed_by_week: Mapping[int, list[int]],
                         upcoming: Sequence[ai_pb2.PlanWeek], deloaded: set[int], result: Adaptation) -> None:
    by_number = {w.week_number: w for w in plan.weeks}
    open_weeks = {w.week_number for w in upcoming}
    for number, missed in sorted(missed_by_week.items()):
        week = by_number[number]
        if len(missed) * 2 < len(week.days):
            continue
        following = by_number.get(number + 1)
        if following is None or following.week_number not in open_weeks or following.kind == DELOAD \
                or following.week_number in deloaded:
            continue
        for source, target in zip(week.days, following.days, strict=True):
            del target.exercises[:]
            target.exercises.extend(source.exercises)
            target.focus = source.focus
        following.kind = week.kind
        done = len(week.days) - len(missed)
        result.changes.append(ai_pb2.PlanChange(
            week_number=following.week_number, kind=ai_pb2.PLAN_CHANGE_KIND_WEEK_REPEATED,
            explanation=f"You did {done} of {len(week.days)} sessions in week {number}, so week "
            f"{following.week_number} repeats week {number} before the plan progresses.",
        ))


def _change_load(plan: ai_pb2.Plan, outcome: Outcome, done: set[str], today: date, deloaded: set[int],
                 names: Mapping[str, str], steps: Mapping[str, float], result: Adaptation) -> None:
    title = names.get(outcome.exercise, outcome.exercise)
    where = f"on day {outcome.day} of week {outcome.week}"
    points = {SHORTFALL: -5.0, TOO_HARD: -2.5, EASY: 2.5}[outcome.kind]
    rpe_step = {SHORTFALL: -1.0, TOO_HARD: -0.5, EASY: 0.5}[outcome.kind]
    kind = ai_pb2.PLAN_CHANGE_KIND_LOAD_INCREASED if points > 0 else ai_pb2.PLAN_CHANGE_KIND_LOAD_DECREASED
    for week in plan.weeks:
        if week.week_number in deloaded:
            continue
        for day in week.days:
            if day_key(week.week_number, day.day_number) in done or date.fromisoformat(day.date) < today:
                continue
            for p in day.exercises:
                if p.exercise != outcome.exercise:
                    continue
                before = ai_pb2.PrescribedExercise()
                before.CopyFrom(p)
                if p.WhichOneof("intensity") == "percent_one_rep_max":
                    new = min(97.5, max(40.0, p.percent_one_rep_max + points))
                    if new == p.percent_one_rep_max:
                        continue
                    if p.weight_kg > 0:
                        step = steps.get(p.exercise, 2.5)
                        p.weight_kg = round_load(p.weight_kg * new / p.percent_one_rep_max, step)
                    change = f"the load goes from {p.percent_one_rep_max:g}% to {new:g}% of your maximum"
                    p.percent_one_rep_max = new
                else:
                    old = target_rpe_of(p)
                    new = min(MAX_RPE, max(MIN_RPE, old + rpe_step))
                    if new == old:
                        continue
                    lighter = "lighter" if rpe_step < 0 else "heavier"
                    change = f"the target effort goes from RPE {old:g} to RPE {new:g}: choose a {lighter} load"
                    p.target_rpe = new
                because = {
                    SHORTFALL: f"You {outcome.detail} of {title} {where}",
                    TOO_HARD: f"{title} was too hard {where}: you {outcome.detail}",
                    EASY: f"{title} was easy {where}: you {outcome.detail}",
                }[outcome.kind]
                sooner = ", sooner than planned" if outcome.kind == EASY else ""
                result.changes.append(ai_pb2.PlanChange(
                    week_number=week.week_number, day_number=day.day_number, kind=kind, before=before, after=p,
                    explanation=f"{because}, so {change}{sooner}.",
                ))


def plan_end(plan: ai_pb2.Plan) -> date:
    """The date of the plan's last training day."""
    return max(date.fromisoformat(d.date) for w in plan.weeks for d in w.days)
