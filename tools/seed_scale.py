"""Data scale: seed users with a realistic history in bulk, then time the hot queries at two sizes.

The documents are written into the services' own collections (their CollectionSpecs, so the same
indexes) of the embedded store, in batched transactions, one store per size; then the hot paths'
repository queries are timed on both stores in alternating rounds, in one run on one machine, so
the ratio is what the data size costs and not what the machine was doing meanwhile. Per user:
the account, SESSIONS_PER_USER completed sessions of SETS_PER_SESSION sets,
RECORDS_PER_USER personal records and NOTIFICATIONS_PER_USER notifications.

    python tools/seed_scale.py --small 10000 --large 1000000 --dir .cache/scale

With ``--wire`` the same runs against FerretDB (the MongoDB-wire server the tests use, SQLite
backend), started in ``<dir>``. Prints progress and writes ``<dir>/scale-report-<store>.json``.
This measures the storage layer under the services (what grows with data); the gRPC and edge
overheads on top of it do not depend on the data size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.notification.repository import NOTIFICATIONS
from services.runtime.storage import CollectionSpec, Document, DocumentStore, EmbeddedStore, MongoStore
from services.user.repository import USERS
from services.workout.repository import RECORDS, SESSIONS
from tests.servers import start_ferretdb  # the same FerretDB (SQLite backend) the tests run

SESSIONS_PER_USER = 12
SETS_PER_SESSION = 10
RECORDS_PER_USER = 6
NOTIFICATIONS_PER_USER = 10
DOCS_PER_USER = 1 + SESSIONS_PER_USER + RECORDS_PER_USER + NOTIFICATIONS_PER_USER
#: Users written per transaction.
BATCH_USERS = 2000
#: Documents per insertMany on the wire server.
WIRE_SLICE = 500
#: Timed calls per query and size, in ROUNDS alternating between the sizes.
SAMPLES = 4000
ROUNDS = 20
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


async def insert_many(store: DocumentStore, spec: CollectionSpec, docs: list[Document]) -> None:
    """One batch into one collection: one SQLite transaction, or one unordered insertMany."""
    if isinstance(store, EmbeddedStore):
        await store.collection(spec).insert_many(docs)
    elif isinstance(store, MongoStore):
        # In slices: each insertMany must finish within the store's operation timeout.
        for first in range(0, len(docs), WIRE_SLICE):
            await store.raw(spec.name).insert_many(docs[first:first + WIRE_SLICE], ordered=False)


async def seed(store: DocumentStore, start: int, stop: int) -> float:
    """Write users [start, stop) in batches; return the seconds it took."""
    began = time.perf_counter()
    specs = {spec.name: spec for spec in SPECS}
    for first in range(start, stop, BATCH_USERS):
        batch: dict[str, list[Document]] = {name: [] for name in specs}
        for i in range(first, min(first + BATCH_USERS, stop)):
            for name, docs in history(i).items():
                batch[name].extend(docs)
        for name, docs in batch.items():
            await insert_many(store, specs[name], docs)
        done = min(first + BATCH_USERS, stop) - start
        elapsed = time.perf_counter() - began
        if done % (BATCH_USERS * 10) == 0 or first + BATCH_USERS >= stop:
            print(f"  seeded {start + done:,} users ({done * DOCS_PER_USER / elapsed:,.0f} documents/s)", flush=True)
    return time.perf_counter() - began


def hot_queries(store: DocumentStore, users: int) -> dict[str, Callable[[random.Random], Awaitable[Any]]]:
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


async def measure(stores: dict[str, tuple[DocumentStore, int]], samples: int) -> dict[str, dict[str, dict[str, float]]]:
    """p50 and p99 (ms) of each hot query on each store, measured in alternating rounds.

    Alternating puts both sizes through the same moments of a shared machine, so what one size's
    figures have and the other's lack is the data size and not a neighbour's burst of work.
    """
    out: dict[str, dict[str, dict[str, float]]] = {label: {} for label in stores}
    queries = {label: hot_queries(store, users) for label, (store, users) in stores.items()}
    rngs = {label: random.Random(users) for label, (_, users) in stores.items()}  # noqa: S311 (which users)
    for name in next(iter(queries.values())):
        times: dict[str, list[float]] = {label: [] for label in stores}
        for _ in range(ROUNDS):
            for label in stores:
                query, rng = queries[label][name], rngs[label]
                for _ in range(samples // ROUNDS):
                    began = time.perf_counter()
                    await query(rng)
                    times[label].append((time.perf_counter() - began) * 1000)
        for label, (_, users) in stores.items():
            cuts = statistics.quantiles(times[label], n=100)
            out[label][name] = {"p50_ms": round(cuts[49], 4), "p99_ms": round(cuts[98], 4)}
            print(f"  {users:>10,} users  {name:<58} p50 {cuts[49]:7.3f} ms  p99 {cuts[98]:7.3f} ms", flush=True)
    return out


async def run(sizes: dict[str, int], stores: dict[str, DocumentStore], samples: int) -> tuple[float, dict[str, Any]]:
    """Seed each store with its number of users, then measure them side by side."""
    seconds = 0.0
    for label, store in stores.items():
        await store.ensure(list(SPECS))
        print(f"==> seeding {sizes[label]:,} users ({DOCS_PER_USER} documents each) into the {label} store",
              flush=True)
        seconds += await seed(store, 0, sizes[label])
    print("==> timing the hot queries on both sizes, in alternating rounds", flush=True)
    measured = await measure({label: (store, sizes[label]) for label, store in stores.items()}, samples)
    for store in stores.values():
        await store.close()
    return seconds, measured


def _bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def report(small: int, large: int, directory: Path, *, wire: bool, samples: int = SAMPLES) -> dict[str, Any]:
    """Run on fresh stores (embedded files, or FerretDB databases in ``directory``); write the report."""
    directory.mkdir(parents=True, exist_ok=True)
    data = (directory / ("ferretdb" if wire else "embedded")).resolve()  # FerretDB runs in a directory of its own
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    sizes = {"small": small, "large": large}
    server = None
    stores: dict[str, DocumentStore]
    if wire:
        server = start_ferretdb(data)
        stores = {label: MongoStore(server.url, f"scale_{label}") for label in sizes}
    else:
        # A query that no index answers fails the run.
        stores = {label: EmbeddedStore(data / f"scale_{label}.sqlite3", refuse_scans=True) for label in sizes}
    try:
        seconds, measured = asyncio.run(run(sizes, stores, samples))
    finally:
        if server is not None:
            server.stop()
    size = _bytes(list(data.rglob("scale_large*")))
    documents = (small + large) * DOCS_PER_USER
    at_small, at_large = measured["small"], measured["large"]
    ratios = {name: {q: round(at_large[name][q] / at_small[name][q], 2) for q in ("p50_ms", "p99_ms")}
              for name in at_small}
    out: dict[str, Any] = {
        "store": "ferretdb-sqlite" if wire else "embedded-sqlite",
        "users": sizes,
        "documents_written": documents,
        "documents_per_user": DOCS_PER_USER,
        "seed_seconds": round(seconds, 1),
        "seed_documents_per_second": round(documents / seconds),
        "disk_bytes_large": size,
        "disk_bytes_per_million_users": round(size / large * 1_000_000),
        "max_rss_bytes_of_this_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "samples_per_query_and_size": samples,
        "ratio_large_to_small": ratios,
        "small": at_small,
        "large": at_large,
    }
    name = f"scale-report-{out['store']}.json"
    (directory / name).write_text(json.dumps(out, indent=2) + "\n")
    print(f"==> {documents:,} documents in {out['seed_seconds']} s ({out['seed_documents_per_second']:,}/s); "
          f"{size / 2**30:.2f} GiB on disk for {large:,} users "
          f"({out['disk_bytes_per_million_users'] / 2**30:.1f} GiB per 1M users)")
    for label, ratio in ratios.items():
        print(f"  at {large:,} / at {small:,} users: p50 {ratio['p50_ms']:5.2f}  p99 {ratio['p99_ms']:5.2f}  {label}")
    print(f"==> report: {directory / name}")
    return out


def main() -> None:
    """Parse the sizes and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000, help="users at the first measurement")
    parser.add_argument("--large", type=int, default=1_000_000, help="users at the second measurement")
    parser.add_argument("--dir", type=Path, default=Path(".cache/scale"), help="where the store and report go")
    parser.add_argument("--wire", action="store_true",
                        help="FerretDB (the MongoDB-wire server) instead of the embedded store")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="timed calls per query and size")
    args = parser.parse_args()
    if not 0 < args.small < args.large:
        parser.error("--small must be positive and less than --large")
    report(args.small, args.large, args.dir, wire=args.wire, samples=max(args.samples, ROUNDS))


if __name__ == "__main__":
    main()
