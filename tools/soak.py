"""Soak run: a steady moderate load for an hour (or as long as asked), watching for anything that grows.

``make soak`` (``python tools/soak.py --minutes 60``) starts a durable Redis and the five services
(one replica each) behind Envoy, runs ``tools.userload`` at a steady pace plus a churn of
Subscribe streams (opened, first message read, cancelled, as a closing app does), and every
``--interval`` seconds samples:

- each process (replicas, Envoy, Redis): resident memory (``VmRSS``) and open file descriptors,
  from ``/proc``;
- each service: tasks alive on its event loop (the ``asyncio_tasks`` gauge on its ``/metrics``);
- Redis: ``used_memory``, keys, and the length of every event stream;
- the data directory: the size of every SQLite file (with its WAL).

The report compares the median of the second quarter of the samples (after warm-up) with the
median of the last quarter and flags a process whose RSS grew by more than 10 % and 8 MiB, whose
FDs grew by more than 8, or whose tasks grew by more than 20. Sizes of stored data grow with the
data written and are reported as a rate, not flagged. ``report.json`` and ``summary.txt`` go to
``.cache/reports/soak/<timestamp>/``; the exit status is 1 when something was flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import redis
from fittracker.notification.v1 import notification_service_pb2, notification_service_pb2_grpc

from tests.servers import RunningServer, start_redis
from tools.devstack import Stack, free_ports
from tools.envoy_config import Limit
from tools.userload import UserLoad

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("user", "workout", "ai", "notification", "analytics")
GENEROUS = Limit(100_000, "second", burst=100_000)
SERVICE_ENV = {
    "FITTRACKER_ENVIRONMENT": "test",
    "FITTRACKER_ARGON2_MEMORY_KIB": "1024",
    "FITTRACKER_ARGON2_TIME_COST": "1",
    "FITTRACKER_GRACE_SECONDS": "1",
    "FITTRACKER_LOG_LEVEL": "WARNING",
}
#: What counts as growth between the second and the last quarter of the samples.
RSS_GROWTH = (0.10, 8 * 1024 * 1024)
FD_GROWTH = 8
TASK_GROWTH = 20


def proc_sample(pid: int) -> dict[str, int]:
    """RSS in bytes and open FDs of ``pid`` (empty when it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return {}
    rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return {"rss": rss, "fds": fds}


def asyncio_tasks(port: int) -> int | None:
    """The ``asyncio_tasks`` gauge of the service whose metrics listen on ``port``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("asyncio_tasks "):
            return int(float(line.split()[1]))
    return None


def redis_sample(url: str) -> dict[str, int]:
    """Redis memory, keys and stream lengths."""
    client = redis.Redis.from_url(url)
    try:
        info = client.info("memory")
        sample = {"used_memory": int(info["used_memory"]), "keys": int(client.dbsize())}
        for key in client.scan_iter(match="events.*", count=1000):
            sample[f"xlen {key.decode()}"] = int(client.xlen(key))
        return sample
    except redis.RedisError:
        return {}
    finally:
        client.close()


def sqlite_sizes(data_dir: Path) -> dict[str, int]:
    """Bytes of every SQLite file in ``data_dir``: each database, its WAL and shared memory apart."""
    return {path.name: path.stat().st_size for path in sorted(data_dir.glob("*.sqlite3*"))}


class SubscribeChurn:
    """Opens a Subscribe stream through the edge, reads its first message, cancels it; again and again."""

    def __init__(self, target: str, token: str, every: float = 0.5) -> None:
        """Churn on ``target`` as the user of ``token``."""
        self.target, self.token, self.every = target, token, every
        self.opened = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="subscribe-churn", daemon=True)

    def start(self) -> None:
        """Start churning."""
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait."""
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = notification_service_pb2_grpc.NotificationServiceStub(channel)
            while not self._stop.wait(self.every):
                call = stub.Subscribe(notification_service_pb2.SubscribeRequest(parent="users/me"),
                                      metadata=(("authorization", f"Bearer {self.token}"),), timeout=10)
                self.opened += 1
                try:
                    next(call)
                except (grpc.RpcError, StopIteration):
                    self.failed += 1
                call.cancel()


def growth(samples: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float | None]) -> tuple[float, float]:
    """Median of the second quarter and of the last quarter of ``pick`` over the samples."""
    values = [pick(s) for s in samples]
    n = len(values)
    early = [v for v in values[n // 4: n // 2] if v is not None] or [v for v in values if v is not None][:1]
    late = [v for v in values[3 * n // 4:] if v is not None] or [v for v in values if v is not None][-1:]
    if not early or not late:
        return 0.0, 0.0
    return float(statistics.median(early)), float(statistics.median(late))


def _reading(group: str, name: str, key: str = "") -> Callable[[dict[str, Any]], float | None]:
    """A picker of one reading of a sample: ``sample[group][name]`` (or its ``key``)."""

    def pick(sample: dict[str, Any]) -> float | None:
        value = sample[group].get(name)
        if key and isinstance(value, dict):
            value = value.get(key)
        return float(value) if isinstance(value, int | float) else None

    return pick


def analyse(samples: list[dict[str, Any]], names: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Per process: RSS, FDs and tasks early vs late; and the flags."""
    rows: list[dict[str, Any]] = []
    flags: list[str] = []
    for name in names:
        rss = growth(samples, _reading("procs", name, "rss"))
        fds = growth(samples, _reading("procs", name, "fds"))
        tasks = growth(samples, _reading("tasks", name))
        row = {"process": name, "rss_mib": [round(rss[0] / 2**20, 1), round(rss[1] / 2**20, 1)],
               "fds": [int(fds[0]), int(fds[1])], "tasks": [int(tasks[0]), int(tasks[1])]}
        rows.append(row)
        if rss[1] - rss[0] > max(RSS_GROWTH[0] * rss[0], RSS_GROWTH[1]):
            flags.append(f"{name}: RSS grew {row['rss_mib'][0]} -> {row['rss_mib'][1]} MiB")
        if fds[1] - fds[0] > FD_GROWTH:
            flags.append(f"{name}: open FDs grew {row['fds'][0]} -> {row['fds'][1]}")
        if tasks[1] - tasks[0] > TASK_GROWTH:
            flags.append(f"{name}: asyncio tasks grew {row['tasks'][0]} -> {row['tasks'][1]}")
    return rows, flags


def run(minutes: float, interval: float, users: int, out: Path, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Start everything, load and sample for ``minutes``, write the report; return it."""
    work = Path(tempfile.mkdtemp(prefix="fittracker-soak-"))
    redis_server = start_redis(work / "redis", durable=True)
    stack = Stack(work / "stack", services=list(SERVICES), replicas=1, use_free_ports=True,
                  service_env={**SERVICE_ENV, "FITTRACKER_REDIS_URL": redis_server.url},
                  ip_limit=GENEROUS, user_limit=GENEROUS, sink=lambda line: None)
    metrics_ports = dict(zip((r.child.name for r in stack.replicas), free_ports(len(stack.replicas)), strict=True))
    for replica in stack.replicas:
        # Replica i serves metrics on FITTRACKER_METRICS_PORT + i.
        replica.child.env["FITTRACKER_METRICS_PORT"] = str(metrics_ports[replica.child.name] - replica.index)
    try:
        say(f"[soak] starting Redis and {', '.join(SERVICES)} + Envoy")
        stack.start(timeout=120)
        return soak(stack, redis_server, metrics_ports, minutes=minutes, interval=interval, users=users, out=out,
                    say=say)
    finally:
        stack.stop()
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)


def soak(stack: Stack, redis_server: RunningServer, metrics_ports: dict[str, int], *, minutes: float,
         interval: float, users: int, out: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The load and the sampling on a running stack."""
    load = UserLoad(stack.host, stack.edge_port, users=users, think=(0.2, 0.6), recommend_every=5)
    load.setup()
    churn = SubscribeChurn(stack.edge_target, load.ledgers[0].token)
    children = {c.name: c for c in stack.children}
    samples: list[dict[str, Any]] = []
    load.start()
    churn.start()
    started = time.monotonic()
    end = started + minutes * 60
    try:
        while True:
            procs = {name: proc_sample(c.process.pid) for name, c in children.items() if c.process is not None}
            if redis_server.process.poll() is None:
                procs["redis"] = proc_sample(redis_server.process.pid)
            now = round(time.monotonic() - started, 1)
            sample: dict[str, Any] = {
                "t": now,
                "procs": procs,
                "tasks": {name: asyncio_tasks(port) for name, port in metrics_ports.items()},
                "redis": redis_sample(redis_server.url),
                "sqlite": sqlite_sizes(stack.data_dir),
                "calls": len(load.records),
            }
            samples.append(sample)
            recent = load.totals(since=now - interval)
            say(f"[soak] {now:7.0f}s / {minutes * 60:.0f}s: {recent['sent']} calls in {interval:.0f}s, "
                f"{recent['failed']} failed, p99 {recent['p99_ms']} ms; RSS "
                + " ".join(f"{n}={p.get('rss', 0) / 2**20:.0f}M" for n, p in procs.items()))
            if time.monotonic() >= end:
                break
            time.sleep(min(interval, max(0.0, end - time.monotonic())))
    finally:
        churn.stop()
        load.stop()
    rows, flags = analyse(samples, [*children, "redis"])
    span_min = max(float(samples[-1]["t"]) - float(samples[0]["t"]), 1.0) / 60
    data_growth = {f"sqlite {k} KiB/min": round((v - samples[0]["sqlite"].get(k, 0)) / 1024 / span_min, 1)
                   for k, v in samples[-1]["sqlite"].items()}
    data_growth |= {f"redis {k}/min": round((v - samples[0]["redis"].get(k, 0)) / span_min, 1)
                    for k, v in samples[-1]["redis"].items()}
    totals = load.totals()
    report = {
        "verdict": "FLAGGED" if flags else "PASS",
        "minutes": round(samples[-1]["t"] / 60, 1), "samples": len(samples), "interval_s": interval,
        "calls": totals["sent"], "failed": totals["failed"], "p99_ms": totals["p99_ms"],
        "subscribe_streams": churn.opened, "subscribe_failed": churn.failed,
        "flags": flags, "processes": rows, "data_growth": data_growth, "samples_detail": samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"soak: {report['verdict']}, {report['minutes']} min, {report['calls']} calls "
             f"({report['failed']} failed), p99 {report['p99_ms']} ms, {churn.opened} Subscribe streams opened "
             "and cancelled",
             f"{'process':<16} {'RSS MiB (early -> late)':>24} {'FDs':>10} {'tasks':>10}"]
    lines += [f"{r['process']:<16} {r['rss_mib'][0]:>11} -> {r['rss_mib'][1]:<10} "
              f"{r['fds'][0]:>4} -> {r['fds'][1]:<4} {r['tasks'][0]:>4} -> {r['tasks'][1]:<4}" for r in rows]
    lines += ["data growth: " + ", ".join(f"{k} {v}" for k, v in data_growth.items())]
    lines += [f"FLAG: {flag}" for flag in flags] or ["nothing grew past the thresholds"]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        say(f"[soak] {line}")
    say(f"[soak] report: {out / 'report.json'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make soak``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="how long (default 60)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples (default: 30, "
                        "or a 20th of a shorter run)")
    parser.add_argument("--users", type=int, default=6, help="virtual users (default 6)")
    parser.add_argument("--report-dir", type=Path, default=ROOT / ".cache" / "reports" / "soak")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.users <= 0 or args.interval < 0:
        parser.error("--minutes and --users must be positive, --interval not negative")
    interval = args.interval or min(30.0, max(2.0, args.minutes * 60 / 20))
    out = args.report_dir / datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    report = run(args.minutes, interval, args.users, out, say=lambda line: print(line, flush=True))
    latest = args.report_dir / "latest"
    shutil.rmtree(latest, ignore_errors=True)
    shutil.copytree(out, latest)
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
