"""Training arithmetic without a server: Epley, record candidates, exercise summaries, the catalog file."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fittracker.common.v1 import fitness_pb2

from services.workout.catalog import MIN_EXERCISES, Catalog, CatalogError
from services.workout.records import (
    BEST_E1RM,
    BEST_SESSION_VOLUME,
    HEAVIEST_WEIGHT,
    MOST_REPS_AT_WEIGHT,
    candidates,
    epley,
    session_volume,
    summaries,
)

CATALOG = Catalog.packaged()


def a_set(exercise: str, reps: int, weight: float, set_type: str = "SET_TYPE_WORKING", n: int = 0) -> dict[str, Any]:
    return {"id": f"s{n}-{reps}-{weight}", "exercise": f"exercises/{exercise}", "set_type": set_type, "reps": reps,
            "weight_kg": weight, "duration_seconds": 0, "distance_m": 0.0}


@pytest.mark.parametrize(
    ("weight", "reps", "expected"),
    [(100, 5, 116.7), (100, 1, 103.3), (60, 12, 84.0), (60, 13, 0.0), (100, 0, 0.0), (0, 10, 0.0), (102.5, 3, 112.8)],
)
def test_epley(weight: float, reps: int, expected: float) -> None:
    assert epley(weight, reps) == expected


def test_candidates_skip_warmups_and_pick_the_first_best_set() -> None:
    sets = [
        a_set("barbell-back-squat", 3, 140, "SET_TYPE_WARMUP"),
        a_set("barbell-back-squat", 5, 100, n=1),
        a_set("barbell-back-squat", 5, 100, n=2),
        a_set("barbell-back-squat", 15, 60, "SET_TYPE_DROPSET"),
        a_set("pull-up", 12, 0),
    ]
    found = {(c.exercise.removeprefix("exercises/"), c.kind, c.weight_kg): c for c in candidates(sets)}
    squat = "barbell-back-squat"
    assert found[(squat, HEAVIEST_WEIGHT, 100)].value == 100
    assert found[(squat, HEAVIEST_WEIGHT, 100)].set_id == "s1-5-100"  # ties go to the first
    assert found[(squat, BEST_E1RM, 100)].value == 116.7  # 15 reps is outside Epley's range
    assert found[(squat, MOST_REPS_AT_WEIGHT, 60)].value == 15
    assert found[(squat, BEST_SESSION_VOLUME, 0)].value == 500 + 500 + 900
    # A body-weight exercise without added load: only reps at 0 kg count.
    assert [(c.kind, c.value) for c in candidates(sets) if c.exercise == "exercises/pull-up"] == [
        (MOST_REPS_AT_WEIGHT, 12)
    ]
    assert found[(squat, MOST_REPS_AT_WEIGHT, 60)].record_id == "barbell-back-squat_most-reps-at-60kg"
    assert candidates([a_set(squat, 4, 102.5)])[2].record_id == "barbell-back-squat_most-reps-at-102_5kg"
    keys = [c.sort_key for c in candidates([a_set("squat", 1, 1), a_set("squat-jump", 1, 1)])]
    assert keys == sorted(keys) and keys[0].startswith("squat ")


def test_summaries_follow_the_order_exercises_were_first_done() -> None:
    sets = [
        a_set("barbell-bench-press", 10, 40, "SET_TYPE_WARMUP"),
        a_set("barbell-back-squat", 5, 100),
        a_set("barbell-bench-press", 8, 80),
        a_set("barbell-back-squat", 3, 110),
        a_set("plank", 0, 0) | {"duration_seconds": 60},
    ]
    out = summaries(sets, CATALOG)
    assert [s.exercise for s in out] == ["exercises/barbell-back-squat", "exercises/barbell-bench-press",
                                         "exercises/plank"]
    squat, bench, plank = out
    assert (squat.set_count, squat.total_reps, squat.total_volume_kg) == (2, 8, 830)
    assert (squat.best_set_weight_kg, squat.best_set_reps, squat.estimated_one_rep_max_kg) == (110, 3, 121.0)
    assert (bench.set_count, bench.total_volume_kg) == (1, 640)  # the warm-up is left out
    assert (plank.total_duration_seconds, plank.estimated_one_rep_max_kg) == (60, 0)
    assert fitness_pb2.MUSCLE_GROUP_CHEST in bench.primary_muscle_groups
    assert session_volume(sets) == 830 + 640


def test_the_packaged_catalog_is_complete_and_checked() -> None:
    assert len(CATALOG.entries) >= MIN_EXERCISES
    for entry in CATALOG.entries:
        ex = entry.exercise
        assert ex.display_name and ex.instructions and ex.primary_muscle_groups and ex.movement_pattern, ex.name
    with pytest.raises(CatalogError, match="unknown muscle_group 'WINGS'"):
        Catalog.from_json(json.dumps({"exercises": [{
            "id": "flap", "display_name": "Flap", "primary_muscle_groups": ["WINGS"], "secondary_muscle_groups": [],
            "equipment": [], "movement_pattern": "CORE", "measurement": "REPS", "instructions": ["Flap."]}]}))
    with pytest.raises(CatalogError):
        Catalog.from_json("[]")
