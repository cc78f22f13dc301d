"""Data scale: seed users with a realistic history in bulk, then time the hot queries at two sizes.

The documents are written into the services' own collections (their CollectionSpecs, so the same
indexes) of the embedded store, in batched transactions, and the hot paths' repository queries are
timed at the small size, the store is grown to the large size, and the same queries are timed again:
both in one run on one machine, so the ratio is what the data size costs and not what the machine
was doing. Per user: the account, SESSIONS_PER_USER completed sessions of SETS_PER_SESSION sets,
RECORDS_PER_USER personal records and NOTIFICATIONS_PER_USER notifications.

    python tools/seed_scale.py --small 10000 --large 1000000 --dir .cache/scale

Prints progress and writes the report to ``<dir>/scale-report.json``. This measures the storage
layer under the services (what grows with data); the gRPC and edge overheads on top of it do not
depend on the data size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.notification.repository import NOTIFICATIONS
from services.runtime.storage import CollectionSpec, Document, EmbeddedStore
from services.user.repository import USERS
from services.workout.repository import RECORDS, SESSIONS

SESSIONS_PER_USER = 12
SETS_PER_SESSION = 10
RECORDS_PER_USER = 6
NOTIFICATIONS_PER_USER = 10
DOCS_PER_USER = 1 + SESSIONS_PER_USER + RECORDS_PER_USER + NOTIFICATIONS_PER_USER
#: Users written per transaction.
BATCH_USERS = 2000
#: Timed calls per query and size.
SAMPLES = 2000
EXERCISES = ["barbell-back-squat", "bench-press", "deadlift", "overhead-press", "pull-up", "barbell-row"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPECS: tuple[CollectionSpec, ...] = (USERS, SESSIONS, RECORDS, NOTIFICATIONS)


def user_id(i: int) -> str:
    """The id of seeded user ``i``."""
    return f"u{i:09d}"


def history(i: int) -> dict[str, list[Document]]:
    """The documents of seeded user ``i``, by collection."""
    uid = user_id(i)
    rng = random.Random(i)  # noqa: S311 (repeatable synthetic data)
    sessions = []
    for s in range(SESSIONS_PER_USER):
        start = T0 + timedelta(days=2 * s, minutes=rng.randrange(1440))
        sid = f"{uid}s{s:03d}"
        sessions.append({
            "_id": sid, "user_id": uid, "name": f"users/{uid}/sessions/{sid}", "state": "COMPLETED",
            "active": sid, "finalized": True, "time_zone": "Europe/Paris",
            "start_time": start, "end_time": start + timedelta(minutes=55), "update_time": start,
            "sets": [{"exercise": f"exercises/{rng.choice(EXERCISES)}", "set_type": "SET_TYPE_WORKING",
                      "reps": rng.randrange(3, 12), "weight_kg": float(rng.randrange(20, 180)),
                      "rpe": float(rng.randrange(6, 10)), "log_time": start + timedelta(minutes=5 * k)}
                     for k in range(SETS_PER_SESSION)],
        })
    records = [{"_id": f"{uid}:{ex}:e1rm", "user_id": uid, "exercise": f"exercises/{ex}", "kind": "E1RM",
                "sort_key": f"{ex}:e1rm", "value": float(rng.randrange(40, 220)), "achieve_time": T0}
               for ex in EXERCISES[:RECORDS_PER_USER]]
    notifications = [{"_id": f"{uid}n{n:03d}", "user_id": uid, "cursor": n + 1, "kind": "PERSONAL_RECORD",
                      "title": "New personal record", "body": "You lifted more than ever before.",
                      "create_time": T0 + timedelta(days=n), "read_time": None if n > 6 else T0}
                     for n in range(NOTIFICATIONS_PER_USER)]
    user = {"_id": uid, "email": f"{uid}@scale.fittracker.test", "display_name": f"Member {i}",
            "password_hash": "$argon2id$v=19$m=65536,t=3,p=4$" + "x" * 64, "create_time": T0,
            "preferences": {"units": "METRIC", "goals": ["STRENGTH"], "time_zone": "Europe/Paris"}}
    return {USERS.name: [user], SESSIONS.name: sessions, RECORDS.name: records, NOTIFICATIONS.name: notifications}


async def seed(store: EmbeddedStore, start: int, stop: int) -> float:
    """Write users [start, stop) in batches; return the seconds it took."""
    began = time.perf_counter()
    collections = {spec.name: store.collection(spec) for spec in SPECS}
    for first in range(start, stop, BATCH_USERS):
        batch: dict[str, list[Document]] = {name: [] for name in collections}
        for i in range(first, min(first + BATCH_USERS, stop)):
            for name, docs in history(i).items():
                batch[name].extend(docs)
        for name, docs in batch.items():
            await collections[name].insert_many(docs)
        done = min(first + BATCH_USERS, stop) - start
        elapsed = time.perf_counter() - began
        if done % (BATCH_USERS * 10) == 0 or first + BATCH_USERS >= stop:
            print(f"  seeded {start + done:,} users ({done * DOCS_PER_USER / elapsed:,.0f} documents/s)", flush=True)
    return time.perf_counter() - began


def hot_queries(store: EmbeddedStore, users: int) -> dict[str, Callable[[random.Random], Awaitable[Any]]]:
    """The hot paths' repository queries, each on a random seeded user."""
    users_col, sessions, records, inbox = (store.collection(s) for s in SPECS)

    def pick(rng: random.Random) -> str:
        return user_id(rng.randrange(users))

    async def log_set(rng: random.Random) -> Any:
        uid = pick(rng)
        return await sessions.update_one({"_id": f"{uid}s{SESSIONS_PER_USER - 1:03d}"}, {"$push": {"sets": {
            "exercise": "exercises/deadlift", "reps": 5, "weight_kg": 100.0, "log_time": T0}}})

    return {
        "Login (user by email)": lambda rng: users_col.find_one({"email": f"{pick(rng)}@scale.fittracker.test"}),
        "GetUser (user by id)": lambda rng: users_col.get(pick(rng)),
        "GetSession (session by id)": lambda rng: sessions.get(f"{pick(rng)}s{rng.randrange(SESSIONS_PER_USER):03d}"),
        "ListSessions (newest 20 of a user)": lambda rng: sessions.find(
            {"user_id": pick(rng)}, sort=[("start_time", -1), ("_id", -1)], limit=20),
        "LogSet (push a set)": log_set,
        "GetUserStats / RecommendNextWorkout (records of a user)": lambda rng: records.find(
            {"user_id": pick(rng)}, sort=[("sort_key", 1)]),
        "ListNotifications (newest 20 of a user)": lambda rng: inbox.find(
            {"user_id": pick(rng)}, sort=[("cursor", -1)], limit=20),
        "due deliveries (retry scan)": lambda rng: inbox.find(
            {"delivery_due_at": {"$lte": T0}}, sort=[("delivery_due_at", 1)], limit=100),
    }


async def measure(store: EmbeddedStore, users: int) -> dict[str, dict[str, float]]:
    """p50 and p99 (ms) of each hot query on ``users`` seeded users."""
    out: dict[str, dict[str, float]] = {}
    rng = random.Random(users)  # noqa: S311 (which users are read)
    for name, query in hot_queries(store, users).items():
        times = []
        for _ in range(SAMPLES):
            began = time.perf_counter()
            await query(rng)
            times.append((time.perf_counter() - began) * 1000)
        cuts = statistics.quantiles(times, n=100)
        out[name] = {"p50_ms": round(cuts[49], 4), "p99_ms": round(cuts[98], 4)}
        print(f"  {users:>10,} users  {name:<58} p50 {cuts[49]:7.3f} ms  p99 {cuts[98]:7.3f} ms", flush=True)
    return out


async def run(small: int, large: int, path: Path) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Seed ``small`` users, measure, grow to ``large``, measure: seconds and both measurements."""
    store = EmbeddedStore(path, refuse_scans=True)  # a query that scans fails the run
    await store.ensure(list(SPECS))
    print(f"==> seeding {small:,} users ({DOCS_PER_USER} documents each) into {path}", flush=True)
    seconds = await seed(store, 0, small)
    at_small = await measure(store, small)
    print(f"==> growing to {large:,} users", flush=True)
    seconds += await seed(store, small, large)
    at_large = await measure(store, large)
    await store.close()
    return seconds, at_small, at_large


def report(small: int, large: int, directory: Path) -> dict[str, Any]:
    """Run in a fresh store in ``directory``; write and print the report."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob("scale.sqlite3*"):
        leftover.unlink()
    seconds, at_small, at_large = asyncio.run(run(small, large, directory / "scale.sqlite3"))
    size = sum(p.stat().st_size for p in directory.glob("scale.sqlite3*"))
    documents = large * DOCS_PER_USER
    ratios = {name: round(at_large[name]["p99_ms"] / at_small[name]["p99_ms"], 2) for name in at_small}
    out: dict[str, Any] = {
        "users": {"small": small, "large": large},
        "documents": documents,
        "documents_per_user": DOCS_PER_USER,
        "seed_seconds": round(seconds, 1),
        "seed_documents_per_second": round(documents / seconds),
        "disk_bytes": size,
        "disk_bytes_per_million_users": round(size / large * 1_000_000),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "p99_ratio_large_to_small": ratios,
        "small": at_small,
        "large": at_large,
    }
    (directory / "scale-report.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"==> {documents:,} documents in {out['seed_seconds']} s "
          f"({out['seed_documents_per_second']:,}/s); {size / 2**30:.2f} GiB on disk "
          f"({out['disk_bytes_per_million_users'] / 2**30:.1f} GiB per 1M users)")
    for name, ratio in ratios.items():
        print(f"  p99 at {large:,} / at {small:,}: {ratio:5.2f}  {name}")
    print(f"==> report: {directory / 'scale-report.json'}")
    return out


def main() -> None:
    """Parse the sizes and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="users at the first measurement")
    parser.add_argument("--large", type=int, default=1_000_000, help="users at the second measurement")
    parser.add_argument("--dir", type=Path, default=Path(".cache/scale"), help="where the store and report go")
    args = parser.parse_args()
    if not 0 < args.small < args.large:
        parser.error("--small must be positive and less than --large")
    report(args.small, args.large, args.dir)


if __name__ == "__main__":
    main()
