"""A mixed user load through the edge (JSON), with every call recorded and the data checked afterwards.

Used by the fault-matrix tests (``tests/faults``), ``make chaos`` and ``make soak``. Each virtual
user is a thread that trains the way the app does: read their profile, start a session, log a few
sets, complete it, read their statistics, now and then ask for a recommendation; with think time
between calls, so the load is bounded by the number of users, not by how fast the stack answers.
The client does not retry (a failed call is a failure a person saw); the edge's own retries are
read from Envoy's counters.

Every call is kept as a ``CallRecord`` (when, what, outcome, latency). Every write the stack
acknowledged is remembered, so that ``check_data`` can tell afterwards what was lost: a set that
was answered 200 and is not in its session, a completed session that is not completed, a
completed session analytics did not count (or counted twice).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PASSWORD = "load password 42"  # noqa: S105 - the load's own throwaway accounts
#: Exercises every user trains: catalog names, read once from the edge.
EXERCISE_QUERY = "/v1/exercises?page_size=20"
#: Calls whose failure a person would notice count towards availability; all calls do.
READ_OPS = frozenset({"get_user", "get_stats", "get_session", "recommend", "list_sessions", "login"})


@dataclass(frozen=True)
class CallRecord:
    """One call: seconds since the load started, the operation, its outcome and latency."""

    at: float
    op: str
    status: int
    latency: float
    error: str = ""

    @property
    def ok(self) -> bool:
        """Answered 200."""
        return self.status == 200


@dataclass
class Ledger:
    """What the stack acknowledged for one user: sets per session and completed sessions."""

    user: str
    token: str
    email: str
    sets: dict[str, list[str]] = field(default_factory=dict)
    completed: set[str] = field(default_factory=set)
    #: Sets whose LogSet failed (not acknowledged): they may or may not exist.
    unsure_sets: int = 0


@dataclass
class _UserState:
    """Where one virtual user is in their training."""

    ledger: Ledger
    rng: random.Random
    index: int
    session: str = ""
    completing: bool = False
    rounds: int = 0


class Edge:
    """A keep-alive HTTP/1.1 connection to the edge, reopened after any failure."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        """Connect lazily to ``host:port``; ``timeout`` bounds every call (the caller's deadline)."""
        self.host, self.port, self.timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None

    def call(self, method: str, path: str, payload: Any = None, token: str = "") -> tuple[int, Any, str]:
        """(HTTP status, parsed body, error text); status 0 when no answer came (reset, timeout)."""
        headers = {"content-type": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        body = None if payload is None else json.dumps(payload)
        try:
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.request(method, path, body=body, headers=headers)
            response = self._conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            return 0, None, f"{type(error).__name__}: {error}"
        if response.getheader("connection", "").lower() == "close":
            self.close()
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        error_text = "" if response.status == 200 else raw[:200].decode(errors="replace")
        return response.status, parsed, error_text

    def close(self) -> None:
        """Drop the connection."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class UserLoad:
    """``users`` virtual users training through the edge until ``stop()``, every call recorded."""

    def __init__(self, host: str, port: int, *, users: int, seed: int = 1, think: tuple[float, float] = (0.05, 0.2),
                 timeout: float = 5.0, recommend_every: int = 4, with_stats: bool = True,
                 max_calls: int = 1_000_000) -> None:
        """Describe the load; ``setup()`` registers the users, ``start()`` runs them.

        ``recommend_every=0`` and ``with_stats=False`` leave out the ai and analytics calls (for a
        stack without those services).
        """
        self.with_stats = with_stats
        self.host, self.port = host, port
        self.users = users
        self.think = think
        self.timeout = timeout
        self.recommend_every = recommend_every
        self.max_calls = max_calls
        self.random = random.Random(seed)  # noqa: S311 - the shape of a load, not a secret
        self.records: list[CallRecord] = []
        self.ledgers: list[Ledger] = []
        self.exercises: list[str] = []
        self.in_flight = 0
        #: Calls the client repeated because an idempotent call's outcome was unknown (CompleteSession).
        self.client_retries = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = 0.0

    # --- set-up ----------------------------------------------------------------------------

    def setup(self) -> None:
        """Register the users and read the exercise catalog (before any fault)."""
        edge = Edge(self.host, self.port, 30.0)
        for _ in range(self.users):
            email = f"load-{uuid.uuid4().hex[:12]}@example.com"
            status, body, error = edge.call("POST", "/v1/users:register",
                                            {"email": email, "password": PASSWORD, "display_name": "Load"})
            if status != 200:
                raise RuntimeError(f"registering a load user failed: {status} {error}")
            self.ledgers.append(Ledger(body["user"]["name"], body["tokens"]["access_token"], email))
        status, body, error = edge.call("GET", EXERCISE_QUERY, token=self.ledgers[0].token)
        if status != 200:
            raise RuntimeError(f"the catalog did not answer: {status} {error}")
        self.exercises = [e["name"] for e in body["exercises"]]
        edge.close()

    # --- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every user's thread."""
        self.started = time.monotonic()
        for index, ledger in enumerate(self.ledgers):
            rng = random.Random(self.random.random())  # noqa: S311 - as above
            thread = threading.Thread(target=self._run, args=(ledger, rng, index), name=f"user-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask every user to stop after its current call, and wait for them."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def run_for(self, seconds: float) -> None:
        """Start, run ``seconds``, stop."""
        self.start()
        self._stop.wait(seconds)
        self.stop()

    def _record(self, op: str, started: float, status: int, error: str) -> None:
        record = CallRecord(started - self.started, op, status, time.monotonic() - started, error)
        with self._lock:
            self.records.append(record)
            self.in_flight -= 1
            if len(self.records) >= self.max_calls:
                self._stop.set()

    def _call(self, edge: Edge, op: str, method: str, path: str, payload: Any, token: str) -> tuple[int, Any]:
        with self._lock:
            self.in_flight += 1
        started = time.monotonic()
        status, body, error = edge.call(method, path, payload, token)
        self._record(op, started, status, error)
        return status, body

    def _pause(self, rng: random.Random) -> bool:
        """Think; False once the load is stopping."""
        return not self._stop.wait(rng.uniform(*self.think))

    def _run(self, ledger: Ledger, rng: random.Random, index: int) -> None:
        edge = Edge(self.host, self.port, self.timeout)
        user = _UserState(ledger, rng, index)
        try:
            while self._pause(rng):
                if not user.session:
                    self._start_session(edge, user)
                elif not user.completing and len(ledger.sets.get(user.session, [])) < rng.randint(2, 4):
                    self._log_set(edge, user)
                else:
                    self._complete(edge, user)
        finally:
            edge.close()

    def _start_session(self, edge: Edge, user: _UserState) -> None:
        token = user.ledger.token
        self._call(edge, "get_user", "GET", "/v1/users/me", None, token)
        if not self._pause(user.rng):
            return
        status, body = self._call(edge, "start_session", "POST", "/v1/users/me/sessions:start",
                                  {"time_zone": "UTC"}, token)
        if status == 200:
            user.session = body["name"]
            user.ledger.sets[user.session] = []
        elif status in (400, 409):
            user.session = self._resume(edge, user.ledger, token)

    def _log_set(self, edge: Edge, user: _UserState) -> None:
        rng = user.rng
        status, body = self._call(edge, "log_set", "POST", f"/v1/{user.session}/sets", {
            "exercise": rng.choice(self.exercises), "set_type": "SET_TYPE_WORKING",
            "reps": rng.randint(3, 12), "weight_kg": rng.choice((20, 40, 60, 80, 100)),
        }, user.ledger.token)
        if status == 200:
            user.ledger.sets[user.session].append(body["name"])
            return
        user.ledger.unsure_sets += 1
        if status == 404:
            user.session = ""  # gone (should never happen): start over

    def _complete(self, edge: Edge, user: _UserState) -> None:
        token = user.ledger.token
        if user.completing:
            with self._lock:
                self.client_retries += 1
        status, _ = self._call(edge, "complete_session", "POST", f"/v1/{user.session}:complete", {}, token)
        # Completing is idempotent: after an unknown outcome the app completes again.
        user.completing = status not in (200, 400)
        if status == 400:
            user.session = ""  # no sets stored (all failed): left in progress, resumed later
        if status != 200:
            return
        user.ledger.completed.add(user.session)
        user.session = ""
        user.rounds += 1
        if self.with_stats and self._pause(user.rng):
            self._call(edge, "get_stats", "GET", "/v1/users/me/stats", None, token)
        if self.recommend_every and (user.rounds + user.index) % self.recommend_every == 0:
            self._call(edge, "recommend", "POST", "/v1/users/me:recommendNextWorkout", {}, token)

    def _resume(self, edge: Edge, ledger: Ledger, token: str) -> str:
        """The session left in progress (a start answered with an error may have started it)."""
        status, body = self._call(edge, "list_sessions", "GET", "/v1/users/me/sessions?page_size=100", None, token)
        if status != 200:
            return ""
        for found in (body or {}).get("sessions", []):
            if found.get("state") == "SESSION_STATE_IN_PROGRESS":
                ledger.sets.setdefault(found["name"], [s["name"] for s in found.get("sets", [])])
                return str(found["name"])
        return ""

    # --- figures ---------------------------------------------------------------------------

    def totals(self, since: float = 0.0, until: float = float("inf")) -> dict[str, Any]:
        """sent, ok, failed and failures by status, for calls started in [since, until)."""
        with self._lock:
            chosen = [r for r in self.records if since <= r.at < until]
        failed = [r for r in chosen if not r.ok]
        return {
            "sent": len(chosen),
            "ok": len(chosen) - len(failed),
            "failed": len(failed),
            "failed_by_status": dict(Counter(str(r.status) for r in failed)),
            "p50_ms": round(percentile([r.latency for r in chosen], 50) * 1000, 1),
            "p99_ms": round(percentile([r.latency for r in chosen], 99) * 1000, 1),
        }

    def failures(self, most: int = 10) -> list[str]:
        """The first ``most`` failures, for assertion messages."""
        with self._lock:
            return [f"{r.op} at {r.at:.2f}s: {r.status} {r.error}" for r in self.records if not r.ok][:most]


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def edge_retries(admin_get: Callable[[str], tuple[int, str]], clusters: Iterable[str],
                 stat: str = "upstream_rq_retry") -> int:
    """Retries the edge made so far: ``stat`` summed over ``clusters``.

    ``upstream_rq_retry_overflow`` counts the retries the retry budget refused instead.
    """
    status, body = admin_get(f"/stats?filter={stat}$")
    if status != 200:
        return 0
    wanted = {f"cluster.{c}.{stat}" for c in clusters}
    total = 0
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if name in wanted:
            total += int(value)
    return total


@dataclass
class DataCheck:
    """What ``check_data`` found: lost acknowledged writes, analytics' count against the sessions."""

    sets_acknowledged: int = 0
    sets_lost: int = 0
    sessions_completed: int = 0
    sessions_lost: int = 0
    #: Sessions the workout service holds as completed (what analytics must count).
    stored_completed: int = 0
    #: Completed sessions analytics counted more than once / not at all (after waiting for it).
    counted_twice: int = 0
    not_counted: int = 0
    #: Completed sessions whose volume is not the sum of their sets (a half-written completion).
    inconsistent: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def lost(self) -> int:
        """Acknowledged writes that are gone, and completed sessions analytics never counted."""
        return self.sets_lost + self.sessions_lost + self.not_counted

    def as_dict(self) -> dict[str, Any]:
        """For reports."""
        return {
            "sets_acknowledged": self.sets_acknowledged, "sets_lost": self.sets_lost,
            "sessions_completed": self.sessions_completed, "sessions_lost": self.sessions_lost,
            "stored_completed": self.stored_completed,
            "counted_twice": self.counted_twice, "not_counted": self.not_counted,
            "inconsistent": self.inconsistent, "lost": self.lost, "problems": self.problems[:20],
        }


def check_data(host: str, port: int, ledgers: Sequence[Ledger], *, settle_seconds: float = 30.0,
               analytics: bool = True) -> DataCheck:
    """Read every user's sessions and statistics back through the edge and compare with the ledgers.

    Analytics is eventually consistent: its count is polled for up to ``settle_seconds`` until it
    equals the completed sessions the workout service holds.
    """
    check = DataCheck()
    edge = Edge(host, port, 10.0)
    try:
        completed = {ledger.user: n for ledger in ledgers if (n := _check_ledger(edge, ledger, check)) is not None}
        if analytics:
            _check_counts(edge, ledgers, completed, check, settle_seconds)
    finally:
        edge.close()
    return check


def _check_ledger(edge: Edge, ledger: Ledger, check: DataCheck) -> int | None:
    """Compare one user's sessions with what was acknowledged; the completed sessions stored."""
    sessions = _all_sessions(edge, ledger)
    if sessions is None:
        check.problems.append(f"{ledger.user}: sessions could not be read")
        return None
    by_name = {s["name"]: s for s in sessions}
    for name, set_names in ledger.sets.items():
        stored = {s["name"] for s in by_name.get(name, {}).get("sets", [])}
        check.sets_acknowledged += len(set_names)
        missing = [s for s in set_names if s not in stored]
        check.sets_lost += len(missing)
        if missing:
            check.problems.append(f"{name}: acknowledged sets missing: {missing[:3]}")
    check.sessions_completed += len(ledger.completed)
    for name in ledger.completed:
        if by_name.get(name, {}).get("state") != "SESSION_STATE_COMPLETED":
            check.sessions_lost += 1
            check.problems.append(f"{name}: acknowledged completion lost")
    completed = [s for s in sessions if s.get("state") == "SESSION_STATE_COMPLETED"]
    check.stored_completed += len(completed)
    for session in completed:
        volume = sum(float(s.get("reps", 0)) * float(s.get("weight_kg", 0)) for s in session.get("sets", [])
                     if s.get("set_type", "SET_TYPE_WORKING") != "SET_TYPE_WARMUP")
        if abs(volume - float(session.get("total_volume_kg", 0))) > 0.01:
            check.inconsistent += 1
            check.problems.append(f"{session['name']}: volume {session.get('total_volume_kg')} != sets {volume}")
    return len(completed)


def _check_counts(edge: Edge, ledgers: Sequence[Ledger], expected: dict[str, int], check: DataCheck,
                  settle_seconds: float) -> None:
    """Poll analytics until each user's session count equals ``expected``; record the differences."""
    tokens = {ledger.user: ledger.token for ledger in ledgers}
    deadline = time.monotonic() + settle_seconds
    counted: dict[str, int] = {}
    while True:
        for user, want in expected.items():
            if counted.get(user) != want:
                status, body, _ = edge.call("GET", "/v1/users/me/stats", token=tokens[user])
                if status == 200:
                    counted[user] = int(body.get("total_sessions", 0))
        if all(counted.get(u) == n for u, n in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for user, want in expected.items():
        got = counted.get(user, 0)
        if got != want:
            check.problems.append(f"{user}: analytics counts {got} sessions, {want} completed")
        check.counted_twice += max(0, got - want)
        check.not_counted += max(0, want - got)


def _all_sessions(edge: Edge, ledger: Ledger) -> list[dict[str, Any]] | None:
    sessions: list[dict[str, Any]] = []
    token = ""
    for _ in range(50):
        path = "/v1/users/me/sessions?page_size=100" + (f"&page_token={token}" if token else "")
        status, body, _ = edge.call("GET", path, token=ledger.token)
        if status != 200:
            return None
        sessions += body.get("sessions", [])
        token = body.get("next_page_token", "")
        if not token:
            return sessions
    return sessions

