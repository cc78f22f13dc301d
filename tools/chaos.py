"""Chaos run: a mixed user load through the edge while replicas and dependencies fail at random.

``make chaos`` (``python tools/chaos.py --minutes 3 --seed 1``) starts a durable Redis and the stack
(user, workout, ai, analytics, two replicas each; ai reaches workout through a latency proxy), runs
``tools.userload`` for the given minutes and, every few seconds, injects one fault chosen by a
seeded random generator (the same seed replays the same faults at the same moments):

- ``kill``: SIGKILL a replica, restart it 1-3 s later;
- ``hang``: SIGSTOP a replica for 2-4 s, then SIGCONT;
- ``redis``: SIGKILL Redis, restart it 1-3 s later;
- ``latency``: 0.5-2 s per hop between ai and workout for 3-5 s;
- ``consumer``: SIGKILL an analytics replica (an event consumer), restart it 1 s later.

One fault at a time, so every service keeps a replica. At the end it reads every user's data
back (``tools.userload.check_data``) and counts the SessionCompleted events published on Redis
against the sessions analytics applied. The report (``report.json`` and ``report.html``, with
p99 over time and the fault moments marked) goes to ``.cache/reports/chaos/<timestamp>/``.
The exit status is 0 when nothing acknowledged was lost, nothing was counted twice and
published equals applied; availability is reported, not judged (it depends on the machine).
"""

from __future__ import annotations

import argparse
import html
import json
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
from fittracker.events.v1 import events_pb2

from tests.servers import RunningServer, start_redis
from tools.devstack import Stack
from tools.envoy_config import Limit
from tools.faults import LatencyProxy, hang, resume
from tools.userload import UserLoad, check_data, edge_retries, percentile

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("user", "workout", "ai", "analytics")
FAULTS = ("kill", "hang", "redis", "latency", "consumer")
GENEROUS = Limit(100_000, "second", burst=100_000)
SERVICE_ENV = {
    "FITTRACKER_ENVIRONMENT": "test",
    "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
    "FITTRACKER_ARGON2_TIME_COST": "1",
    "FITTRACKER_GRACE_SECONDS": "1",
    "FITTRACKER_DRAIN_NOTICE_SECONDS": "0",
    "FITTRACKER_LOG_LEVEL": "WARNING",
    "FITTRACKER_EVENTS_CLAIM_IDLE_SECONDS": "2",
}


@dataclass
class FaultEvent:
    """One injected fault: when it started and ended (seconds into the load), what and where."""

    kind: str
    target: str
    start: float
    end: float = 0.0


@dataclass
class Chaos:
    """Injects seeded random faults into a running stack, one at a time."""

    stack: Stack
    redis: RunningServer
    proxy: LatencyProxy
    rng: random.Random
    say: Callable[[str], None] = print
    events: list[FaultEvent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self, load: UserLoad, seconds: float, gap: tuple[float, float] = (2.0, 5.0)) -> None:
        """Inject faults until ``seconds`` into the load, leaving a quiet gap between them."""
        end = load.started + seconds
        while not self._stop.wait(self.rng.uniform(*gap)):
            if time.monotonic() + 6.0 > end:  # the longest fault must end before the load does
                break
            kind = self.rng.choice(FAULTS)
            event = FaultEvent(kind, "", time.monotonic() - load.started)
            self.events.append(event)
            getattr(self, f"_{kind}")(event)
            event.end = time.monotonic() - load.started
            self.say(f"[chaos] {event.start:6.1f}s {kind:<8} {event.target:<14} for {event.end - event.start:.1f}s")
        self._stop.wait(max(0.0, end - time.monotonic()))

    def _pick(self, services: Sequence[str]) -> Any:
        service = self.rng.choice(list(services))
        return self.stack.replica(service, self.rng.randrange(2))

    def _kill(self, event: FaultEvent) -> None:
        replica = self._pick(SERVICES)
        event.target = replica.child.name
        replica.child.signal(signal.SIGKILL)
        replica.child.wait(5)
        time.sleep(self.rng.uniform(1.0, 3.0))
        self.stack.restart_replica(replica)

    def _hang(self, event: FaultEvent) -> None:
        replica = self._pick(SERVICES)
        event.target = replica.child.name
        hang(replica.child)
        try:
            time.sleep(self.rng.uniform(2.0, 4.0))
        finally:
            resume(replica.child)

    def _redis(self, event: FaultEvent) -> None:
        event.target = "redis"
        self.redis.kill()
        time.sleep(self.rng.uniform(1.0, 3.0))
        self.redis.restart()

    def _latency(self, event: FaultEvent) -> None:
        delay = round(self.rng.uniform(0.5, 2.0), 2)
        event.target = f"ai->workout {delay}s"
        self.proxy.delay = delay
        try:
            time.sleep(self.rng.uniform(3.0, 5.0))
        finally:
            self.proxy.delay = 0.0

    def _consumer(self, event: FaultEvent) -> None:
        replica = self._pick(["analytics"])
        event.target = replica.child.name
        replica.child.signal(signal.SIGKILL)
        replica.child.wait(5)
        time.sleep(1.0)
        self.stack.restart_replica(replica)


def published_completions(redis_url: str, users: set[str]) -> int:
    """Distinct SessionCompleted events of ``users`` on the workout stream."""
    client = redis.Redis.from_url(redis_url)
    seen: set[str] = set()
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange("events.workout", "-", "+") or []  # type: ignore[assignment]  # a bytes client
        for _, fields in entries:
            envelope = events_pb2.EventEnvelope.FromString(fields[b"envelope"])
            if envelope.WhichOneof("payload") == "session_completed" and envelope.user in users:
                seen.add(envelope.event_id)
    finally:
        client.close()
    return len(seen)


def timeline(load: UserLoad, window: float) -> list[dict[str, float]]:
    """Per window: calls, availability and p99 of the calls that started in it."""
    rows = []
    end = max((r.at for r in load.records), default=0.0)
    start = 0.0
    while start <= end:
        chosen = [r for r in load.records if start <= r.at < start + window]
        ok = sum(r.ok for r in chosen)
        rows.append({"t": start, "calls": len(chosen), "availability": ok / len(chosen) if chosen else 1.0,
                     "p99_ms": percentile([r.latency for r in chosen], 99) * 1000})
        start += window
    return rows


def svg_chart(points: list[dict[str, float]], faults: list[FaultEvent], window: float) -> str:
    """p99 per window as a line, faults as shaded spans with their names; inline SVG, no scripts."""
    width, height, pad = 900, 260, 40
    span = max((p["t"] for p in points), default=1.0) + window
    top = max([p["p99_ms"] for p in points] + [100.0])

    def x(t: float) -> float:
        return pad + (width - 2 * pad) * t / span

    def y(ms: float) -> float:
        return height - pad - (height - 2 * pad) * ms / top

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="10">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#999"/>',
             f'<text x="2" y="{pad - 6}">{top:.0f} ms</text><text x="2" y="{height - pad}">0</text>']
    for fault in faults:
        parts.append(f'<rect x="{x(fault.start):.1f}" y="{pad}" width="{max(1.0, x(fault.end) - x(fault.start)):.1f}" '
                     f'height="{height - 2 * pad}" fill="#f4a" fill-opacity="0.15"/>'
                     f'<text x="{x(fault.start):.1f}" y="{pad - 2}" fill="#a04">{html.escape(fault.kind)}</text>')
    line = " ".join(f"{x(p['t'] + window / 2):.1f},{y(p['p99_ms']):.1f}" for p in points)
    parts.append(f'<polyline points="{line}" fill="none" stroke="#036" stroke-width="1.5"/>')
    parts.append(f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">seconds into the run '
                 f"(p99 per {window:.0f} s window; shaded: a fault)</text></svg>")
    return "".join(parts)


def write_report(out: Path, report: dict[str, Any], points: list[dict[str, float]], faults: list[FaultEvent],
                 window: float) -> None:
    """report.json and report.html in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({**report, "timeline": points}, indent=2) + "\n")
    rows = "".join(f"<tr><td>{f.start:.1f}</td><td>{f.end:.1f}</td><td>{html.escape(f.kind)}</td>"
                   f"<td>{html.escape(f.target)}</td></tr>" for f in faults)
    summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                      for k, v in report.items() if k not in ("faults", "data"))
    data = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in report["data"].items())
    (out / "report.html").write_text(
        "<!doctype html><meta charset=utf-8><title>FitTracker chaos run</title>"
        "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style>"
        f"<h1>Chaos run: {html.escape(report['verdict'])}</h1><table>{summary}</table>"
        f"<h2>p99 over time</h2>{svg_chart(points, faults, window)}"
        f"<h2>Data checks</h2><table>{data}</table>"
        f"<h2>Faults</h2><table><tr><th>from s</th><th>to s</th><th>fault</th><th>target</th></tr>{rows}</table>")


def run(minutes: float, seed: int, users: int, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything, run the chaos, check the data, write the report; return it."""
    work = Path(tempfile.mkdtemp(prefix="fittracker-chaos-"))
    redis_server = start_redis(work / "redis", durable=True)
    stack = Stack(work / "stack", services=list(SERVICES), replicas=2, use_free_ports=True,
                  service_env={**SERVICE_ENV, "FITTRACKER_REDIS_URL": redis_server.url},
                  ip_limit=GENEROUS, user_limit=GENEROUS, sink=lambda line: None)
    proxy = LatencyProxy([(a.host, a.port) for a in stack.topology["workout"]])
    proxy.start()
    for replica in stack.replicas:
        if replica.service == "ai":
            replica.child.env["FITTRACKER_WORKOUT_ADDR"] = proxy.address
    try:
        say(f"[chaos] starting Redis and {', '.join(SERVICES)} (2 replicas each) + Envoy")
        stack.start(timeout=120)
        return execute(stack, redis_server, proxy, minutes=minutes, seed=seed, users=users, out=out, say=say)
    finally:
        stack.stop()
        proxy.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


def execute(stack: Stack, redis_server: RunningServer, proxy: LatencyProxy, *, minutes: float, seed: int,
            users: int, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The chaos on a running stack (tests call this with theirs); returns the report."""
    seconds = minutes * 60
    load = UserLoad(stack.host, stack.edge_port, users=users, seed=seed)
    load.setup()
    retries_before = edge_retries(stack.admin_get, stack.services)
    chaos = Chaos(stack, redis_server, proxy, random.Random(seed), say)  # noqa: S311 - replayable faults
    say(f"[chaos] {users} users for {seconds:.0f}s, seed {seed}")
    progress = threading.Thread(target=_progress, args=(load, seconds, say), daemon=True)
    load.start()
    progress.start()
    try:
        chaos.run(load, seconds)
    finally:
        load.stop()
    say("[chaos] load stopped; reading every user's data back")
    check = check_data(stack.host, stack.edge_port, load.ledgers, settle_seconds=60.0)
    completed = check.stored_completed
    published = published_completions(redis_server.url, {ledger.user for ledger in load.ledgers})
    applied = completed - check.not_counted + check.counted_twice
    totals = load.totals()
    window = 5.0 if seconds >= 60 else 2.0
    points = timeline(load, window)
    ok = check.lost == 0 and check.counted_twice == 0 and check.inconsistent == 0 and published == applied
    report = {
        "verdict": "PASS" if ok else "FAIL",
        "seed": seed, "minutes": minutes, "users": users, "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "calls": totals["sent"], "failed": totals["failed"], "failed_by_status": totals["failed_by_status"],
        "availability": round(totals["ok"] / totals["sent"], 5) if totals["sent"] else 0.0,
        "p50_ms": totals["p50_ms"], "p99_ms": totals["p99_ms"],
        "worst_window_p99_ms": round(max((p["p99_ms"] for p in points), default=0.0), 1),
        "retried_by_edge": edge_retries(stack.admin_get, stack.services) - retries_before,
        "retried_by_client": load.client_retries,
        "events_published": published, "events_applied": applied, "sessions_completed": completed,
        "faults": [f.__dict__ for f in chaos.events],
        "data": check.as_dict(),
    }
    write_report(out, report, points, chaos.events, window)
    say(f"[chaos] {report['verdict']}: availability {report['availability']:.4%} of {report['calls']} calls, "
        f"p99 {report['p99_ms']} ms, {len(chaos.events)} faults, events published {published} / applied {applied}, "
        f"lost {check.lost}, counted twice {check.counted_twice}")
    say(f"[chaos] report: {out / 'report.html'}")
    return report


def _progress(load: UserLoad, seconds: float, say: Callable[[str], None]) -> None:
    step = max(10.0, seconds / 12)
    while True:
        time.sleep(step)
        elapsed = time.monotonic() - load.started
        if elapsed >= seconds:
            return
        totals = load.totals(since=elapsed - step)
        say(f"[chaos] {elapsed:5.0f}s / {seconds:.0f}s: {totals['sent']} calls in the last {step:.0f}s, "
            f"{totals['failed']} failed, p99 {totals['p99_ms']} ms")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make chaos``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load runs (default 3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the faults and the load (replays a run)")
    parser.add_argument("--users", type=int, default=8, help="virtual users (default 8)")
    parser.add_argument("--report-dir", type=Path, default=ROOT / ".cache" / "reports" / "chaos")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.users <= 0:
        parser.error("--minutes and --users must be positive")
    out = args.report_dir / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    report = run(args.minutes, args.seed, args.users, out, say=lambda line: print(line, flush=True))
    latest = args.report_dir / "latest"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(out, latest)
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
