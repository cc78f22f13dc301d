"""The exercise catalog: shipped with the package as ``catalog.json``, seeded into the store, served from memory.

The catalog is the same for every user and changes only with a release, so each process holds it
in memory (a few hundred kilobytes) and answers ListExercises and GetExercise without touching the
store. It is still written to the ``workout_exercises`` collection at start, so that other readers (ad-hoc
queries, data exports) see the same exercises under the same stable ids; a digest of the file
makes that seeding a single read when nothing changed, however many replicas start at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Any

from fittracker.common.v1 import fitness_pb2
from fittracker.workout.v1 import workout_pb2

from services.runtime.storage import CollectionSpec, DocumentStore
from services.runtime.timeutil import now

CATALOG_FILE = "catalog.json"
#: A catalog smaller than this is a packaging mistake, not a release.
MIN_EXERCISES = 100
_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

EXERCISES = CollectionSpec(
    name="workout_exercises",
    shard_key=("_id",),
    why="a few hundred shared documents read by id; the collection is small enough to stay unsharded, "
    "and _id is the only key any reader uses",
)
#: One document per seeded artefact (the catalog), holding the digest of what was last written.
WORKOUT_META = CollectionSpec(
    name="workout_meta",
    shard_key=("_id",),
    why="a handful of documents addressed by name; never sharded in practice",
)


class CatalogError(ValueError):
    """The packaged catalog file is malformed; the service must not start with it."""


def fold(text: str) -> str:
    """``text`` lower-cased with accents removed, for matching that ignores both."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


@dataclass(frozen=True)
class CatalogEntry:
    """One exercise, as served and as matched."""

    exercise: workout_pb2.Exercise
    #: The display name folded (lower case, no accents), the sort key and the search text.
    sort_key: str
    #: The folded display name and id, searched word by word by ListExercises' query.
    search_text: str
    muscle_groups: frozenset[int]
    equipment: frozenset[int]

    @property
    def name(self) -> str:
        """The resource name, "exercises/{id}"."""
        return self.exercise.name


def _enum_values(raw: list[str], enum: Any, prefix: str, where: str) -> list[int]:
    values = []
    for short in raw:
        try:
            values.append(int(enum.Value(f"{prefix}_{short}")))
        except ValueError:
            raise CatalogError(f"{where}: unknown {prefix.lower()} {short!r}") from None
    return values


def _entry(item: dict[str, Any]) -> CatalogEntry:
    exercise_id = str(item.get("id", ""))
    if not _ID.fullmatch(exercise_id):
        raise CatalogError(f"catalog entry {exercise_id!r}: id must match {_ID.pattern}")
    where = f"exercises/{exercise_id}"
    display_name = str(item.get("display_name", "")).strip()
    instructions = [str(step) for step in item.get("instructions", [])]
    if not display_name or not instructions:
        raise CatalogError(f"{where}: display_name and instructions are required")
    primary = _enum_values(item["primary_muscle_groups"], fitness_pb2.MuscleGroup, "MUSCLE_GROUP", where)
    if not primary:
        raise CatalogError(f"{where}: needs at least one primary muscle group")
    secondary = _enum_values(item["secondary_muscle_groups"], fitness_pb2.MuscleGroup, "MUSCLE_GROUP", where)
    equipment = _enum_values(item["equipment"], fitness_pb2.Equipment, "EQUIPMENT", where)
    pattern = _enum_values([item["movement_pattern"]], fitness_pb2.MovementPattern, "MOVEMENT_PATTERN", where)[0]
    measurement = _enum_values([item["measurement"]], workout_pb2.ExerciseMeasurement, "EXERCISE_MEASUREMENT", where)
    exercise = workout_pb2.Exercise(
        name=where,
        display_name=display_name,
        primary_muscle_groups=primary,  # type: ignore[arg-type]  # validated enum numbers
        secondary_muscle_groups=secondary,  # type: ignore[arg-type]
        equipment=equipment,  # type: ignore[arg-type]
        movement_pattern=pattern,  # type: ignore[arg-type]
        instructions=instructions,
        is_compound=bool(item.get("is_compound", False)),
        measurement=measurement[0],  # type: ignore[arg-type]
    )
    return CatalogEntry(
        exercise=exercise,
        sort_key=fold(display_name),
        search_text=f"{fold(display_name)} {exercise_id.replace('-', ' ')}",
        muscle_groups=frozenset(primary) | frozenset(secondary),
        equipment=frozenset(equipment),
    )


def _document(entry: CatalogEntry, digest: str) -> dict[str, Any]:
    """The stored form of an exercise: enum names rather than numbers, so a query reads as it says."""
    ex = entry.exercise
    return {
        "_id": ex.name.removeprefix("exercises/"),
        "display_name": ex.display_name,
        "primary_muscle_groups": [fitness_pb2.MuscleGroup.Name(m) for m in ex.primary_muscle_groups],
        "secondary_muscle_groups": [fitness_pb2.MuscleGroup.Name(m) for m in ex.secondary_muscle_groups],
        "equipment": [fitness_pb2.Equipment.Name(e) for e in ex.equipment],
        "movement_pattern": fitness_pb2.MovementPattern.Name(ex.movement_pattern),
        "instructions": list(ex.instructions),
        "is_compound": ex.is_compound,
        "measurement": workout_pb2.ExerciseMeasurement.Name(ex.measurement),
        "catalog_digest": digest,
    }


class Catalog:
    """The immutable exercise catalog in memory, sorted by display name."""

    def __init__(self, entries: list[CatalogEntry], digest: str) -> None:
        """Index ``entries``; ``digest`` identifies the file they came from."""
        self.entries = sorted(entries, key=lambda e: (e.sort_key, e.name))
        self.digest = digest
        self._by_name = {e.name: e for e in self.entries}
        if len(self._by_name) != len(self.entries):
            raise CatalogError("catalog ids must be unique")

    @classmethod
    def from_json(cls, text: str) -> Catalog:
        """Parse and check a catalog document; raise CatalogError naming the first bad entry."""
        try:
            document = json.loads(text)
            items = document["exercises"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CatalogError(f"catalog is not a JSON object with an 'exercises' list: {exc}") from None
        try:
            entries = [_entry(item) for item in items]
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"catalog entry is missing or mistypes a field: {exc}") from None
        return cls(entries, hashlib.sha256(text.encode()).hexdigest())

    @classmethod
    def packaged(cls) -> Catalog:
        """The catalog shipped in this package; at least MIN_EXERCISES exercises."""
        text = resources.files(__package__).joinpath(CATALOG_FILE).read_text(encoding="utf-8")
        catalog = cls.from_json(text)
        if len(catalog.entries) < MIN_EXERCISES:
            raise CatalogError(f"the packaged catalog has {len(catalog.entries)} exercises, fewer than {MIN_EXERCISES}")
        return catalog

    def get(self, name: str) -> CatalogEntry | None:
        """The exercise named "exercises/{id}", or None."""
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        """Whether "exercises/{id}" is in the catalog."""
        return name in self._by_name

    def search(
        self, *, muscle_group: int = 0, equipment: int = 0, movement_pattern: int = 0, query: str = ""
    ) -> list[CatalogEntry]:
        """The entries matching every given filter, in display-name order.

        ``equipment`` keeps exercises that can be done with that equipment alone or with none: all
        the equipment they list is either it or body weight. ``query`` keeps exercises whose
        display name (or id) contains every word of it, ignoring case and accents.
        """
        words = fold(query).split()
        usable = {equipment, fitness_pb2.EQUIPMENT_BODYWEIGHT}
        return [
            e
            for e in self.entries
            if (not muscle_group or muscle_group in e.muscle_groups)
            and (not equipment or e.equipment <= usable)
            and (not movement_pattern or e.exercise.movement_pattern == movement_pattern)
            and all(w in e.search_text for w in words)
        ]

    async def seed(self, store: DocumentStore) -> bool:
        """Write the catalog to the store unless this very file was written before; True when written.

        Upserts by stable id, so it is idempotent and safe when several replicas start together.
        Exercises dropped from the file stay stored: routines and sessions may still name them.
        """
        await store.ensure([EXERCISES, WORKOUT_META])
        meta = store.collection(WORKOUT_META)
        seeded = await meta.get("catalog")
        if seeded is not None and seeded.get("digest") == self.digest:
            return False
        exercises = store.collection(EXERCISES)
        for entry in self.entries:
            doc = _document(entry, self.digest)
            exercise_id = doc.pop("_id")
            await exercises.update_one({"_id": exercise_id}, {"$set": doc}, upsert=True)
        # Written last: a crash half-way leaves the old digest, so the next start seeds again.
        await meta.update_one(
            {"_id": "catalog"}, {"$set": {"digest": self.digest, "count": len(self.entries), "seed_time": now()}},
            upsert=True,
        )
        return True
