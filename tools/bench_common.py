"""What the load-test runner and the benchmarks share: load generators, Redis, progress, HTML.

ghz and h2load runs, a private Redis, a progress line, and the pieces of a self-contained HTML
report (tables and inline SVG bar charts).

Every load run here is bounded twice: by its own count or duration, and by a hard wall-clock
limit after which the load generator is killed, so a wedged target cannot hang a run.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
GHZ = ROOT / ".cache" / "bin" / "ghz"
GHZ_REPORT = ROOT / ".cache" / "bin" / "ghz-report"
GHZ_REPORT_SOURCE = ROOT / "ghz-loadtests" / "ghz-report"
PROTOSET = ROOT / "envoy" / "generated" / "fittracker.binpb"
#: Percentiles every result carries (ghz reports 10, 25, 50, 75, 90, 95, 99).
PERCENTILES = (50, 95, 99)
#: Slack on top of a run's own bound before it is killed: ghz start-up, the last calls' timeouts.
KILL_SLACK_SECONDS = 30.0


class BenchError(RuntimeError):
    """A tool is missing or a run could not be made; the message says which and how to fix it."""


# --------------------------------------------------------------------------------------------
# Small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel reports free now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def parse_duration(text: str | int | float | None) -> float:
    """Seconds in a Go duration ("20s", "1m30s", "500ms") or a number of seconds; 0 for none."""
    if not text:
        return 0.0
    if isinstance(text, int | float):
        return float(text)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
    total, matched = 0.0, ""
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)", text):
        total += float(number) * units[unit]
        matched += number + unit
    if matched != text:
        raise ValueError(f"not a duration: {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """A Go duration string ghz accepts."""
    return f"{seconds:g}s" if seconds >= 1 else f"{round(seconds * 1000)}ms"


def git_commit() -> str:
    """The commit the tree is at (with "+dirty" when it has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine() -> dict[str, Any]:
    """What limits the numbers: cores, load average when the run started, the Python build."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in load],
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }


def write_json(path: Path, document: object) -> None:
    """Write ``document`` as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Progress: one line per run, updated in place on a terminal


class Progress:
    """Prints one line per run: elapsed and remaining while it runs (on a TTY), the result after."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        """Write to ``out``; in-place updates only when it is a terminal."""
        self._out = out
        self._live = out.isatty()
        self._label = ""
        self._expected = 0.0
        self._started = 0.0

    def start(self, label: str, expected_seconds: float) -> None:
        """A run began; it should take about ``expected_seconds`` (0 when unknown)."""
        self._label, self._expected, self._started = label, expected_seconds, time.monotonic()
        if not self._live:
            about = f" (about {expected_seconds:.0f}s)" if expected_seconds else ""
            print(f"{label} ...{about}", file=self._out, flush=True)
        else:
            self.tick()

    def tick(self) -> None:
        """Refresh the running line (no-op when not a terminal)."""
        if not self._live:
            return
        elapsed = time.monotonic() - self._started
        if self._expected:
            left = max(self._expected - elapsed, 0.0)
            status = f"{elapsed:5.1f}s / {self._expected:.0f}s  ({left:4.1f}s left)"
        else:
            status = f"{elapsed:5.1f}s"
        print(f"\r\033[K{self._label}  {status}", end="", file=self._out, flush=True)

    def done(self, summary: str) -> None:
        """The run ended: replace the line with ``summary``."""
        elapsed = time.monotonic() - self._started
        prefix = "\r\033[K" if self._live else ""
        print(f"{prefix}{self._label}  {elapsed:5.1f}s  {summary}", file=self._out, flush=True)

    def note(self, text: str) -> None:
        """A line of its own (set-up steps)."""
        print(text, file=self._out, flush=True)


def run_bounded(argv: Sequence[str], *, limit_seconds: float, progress: Progress | None = None,
                cwd: Path = ROOT, stdout: int | TextIO | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``, refreshing ``progress``; kill it (and its group) after ``limit_seconds``."""
    process = subprocess.Popen(
        list(argv), cwd=cwd, stdout=stdout if stdout is not None else subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.monotonic() + limit_seconds
    while True:
        try:
            out, err = process.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if progress is not None:
                progress.tick()
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise BenchError(
                    f"{Path(argv[0]).name} ran past its {limit_seconds:.0f}s bound and was killed"
                ) from None
    return subprocess.CompletedProcess(list(argv), process.returncode, out or "", err or "")


# --------------------------------------------------------------------------------------------
# ghz


@dataclass
class LoadResult:
    """What one load run measured; latencies in milliseconds, of successful calls only."""

    count: int
    seconds: float
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    codes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def error_rate(self, allowed: Sequence[str] = ()) -> float:
        """Share of calls that ended with a status not OK and not in ``allowed``."""
        if not self.count:
            return 1.0
        bad = sum(n for code, n in self.codes.items() if code != "OK" and code not in allowed)
        return bad / self.count

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def ghz_result(report: Mapping[str, Any]) -> LoadResult:
    """The figures of a ghz JSON report."""
    percentiles = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution") or []}
    count = int(report.get("count", 0))
    return LoadResult(
        count=count,
        seconds=report.get("total", 0) / 1e9,
        rps=float(report.get("rps", 0.0)),
        p50_ms=percentiles.get(50),
        p95_ms=percentiles.get(95),
        p99_ms=percentiles.get(99),
        # ghz leaves failed calls out of its latencies (unless count-errors): no successes, no mean.
        mean_ms=report["average"] / 1e6 if percentiles and report.get("average") else None,
        codes=dict(report.get("statusCodeDistribution") or {}),
        errors=dict(report.get("errorDistribution") or {}),
    )


def require_ghz() -> Path:
    """The ghz binary, or a BenchError saying how to build it."""
    if not GHZ.exists():
        raise BenchError(f"ghz not found at {GHZ}: run `make deps` (tools/install_deps.sh)")
    return GHZ


def expected_seconds(config: Mapping[str, Any]) -> float:
    """How long a ghz config should run: its duration, or its count at its rate (0 when unknown)."""
    duration = parse_duration(config.get("duration"))
    if duration:
        return duration
    rps, total = config.get("rps") or 0, config.get("total") or 0
    return total / rps if rps and total else 0.0


def run_ghz(config: Mapping[str, Any], workdir: Path, name: str, *, progress: Progress | None = None,
            keep_details: bool = False) -> tuple[LoadResult, Path]:
    """Run ghz with ``config`` (written to ``workdir/<name>.config.json``); its JSON lands beside it.

    ghz writes every call's detail into its JSON; unless ``keep_details``, they are dropped
    afterwards (a 20 s run at 3,000 rps is 10 MB of them; the summary keeps every figure).
    """
    ghz = require_ghz()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / f"{name}.config.json"
    json_path = workdir / f"{name}.json"
    effective = {**config, "format": "json", "output": str(json_path)}
    write_json(config_path, effective)
    bound = expected_seconds(effective) or parse_duration(effective.get("max-duration")) or 60.0
    done = run_bounded([str(ghz), "--config", str(config_path)], limit_seconds=bound + KILL_SLACK_SECONDS,
                       progress=progress)
    if not json_path.exists() or json_path.stat().st_size == 0:
        said = (done.stderr.strip() or done.stdout.strip())
        # ghz repeats a data error once per call; the first few hundred characters say it all.
        raise BenchError(f"ghz wrote no report for {name}: {said[:400]}{' ...' if len(said) > 400 else ''}")
    report = json.loads(json_path.read_text())
    if not keep_details and report.pop("details", None) is not None:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    return ghz_result(report), json_path


def ghz_report_binary(log: Callable[[str], None] = print) -> Path | None:
    """The JSON-to-HTML converter built from ghz's own printer; built with Go on first use.

    ghz writes one format per run; this renders ghz's own HTML page from the JSON it wrote,
    instead of running every scenario twice. None (and a note) when Go is not available.
    """
    sources = [GHZ_REPORT_SOURCE / n for n in ("main.go", "go.mod", "go.sum")]
    if GHZ_REPORT.exists() and all(GHZ_REPORT.stat().st_mtime >= s.stat().st_mtime for s in sources):
        return GHZ_REPORT
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None)
    if go is None:
        log("[ghz-report] Go not found: ghz's HTML pages are skipped (the JSON and the summary are complete)")
        return None
    log(f"[ghz-report] building {GHZ_REPORT.relative_to(ROOT)} from {GHZ_REPORT_SOURCE.relative_to(ROOT)}")
    GHZ_REPORT.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOFLAGS": "-buildvcs=false"}
    built = subprocess.run([go, "build", "-o", str(GHZ_REPORT), "."], check=False, cwd=GHZ_REPORT_SOURCE, env=env,
                           capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        log(f"[ghz-report] build failed, HTML pages skipped:\n{built.stderr.strip()}")
        return None
    return GHZ_REPORT


def ghz_html(converter: Path | None, json_path: Path) -> Path | None:
    """Render ghz's HTML page for one JSON report next to it."""
    if converter is None:
        return None
    html_path = json_path.with_suffix(".html")
    done = subprocess.run([str(converter), str(json_path), str(html_path)], check=False, capture_output=True,
                          text=True, timeout=60)
    return html_path if done.returncode == 0 else None


# --------------------------------------------------------------------------------------------
# h2load (HTTP: the edge's JSON routes)


def run_h2load(url: str, *, headers: Mapping[str, str], seconds: float, clients: int, streams: int,
               rps_per_client: float = 0.0, progress: Progress | None = None,
               extra: Sequence[str] = ()) -> LoadResult:
    """Load ``url`` with h2load over HTTP/2 cleartext for ``seconds`` (h2load reports no p95/p99).

    ``extra`` adds h2load options, e.g. ``-d body`` to POST a body.
    """
    h2load = shutil.which("h2load")
    if h2load is None:
        raise BenchError("h2load not found: run `make deps` (it installs nghttp2-client)")
    argv = [h2load, "-D", str(max(1, round(seconds))), "-c", str(clients), "-m", str(streams), "-t", "1",
            "--warm-up-time=1"]
    if rps_per_client:
        argv += ["--rps", f"{rps_per_client:g}"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv += [*extra, url]
    done = run_bounded(argv, limit_seconds=seconds + KILL_SLACK_SECONDS, progress=progress)
    if done.returncode != 0:
        raise BenchError(f"h2load failed: {done.stderr.strip() or done.stdout.strip()}")
    return h2load_result(done.stdout, seconds)


def h2load_result(text: str, seconds: float) -> LoadResult:
    """Parse h2load's summary: requests, status codes, req/s and the latency mean and spread."""
    succeeded = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                          r"(\d+) errored", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", text)
    if succeeded is None or rate is None:
        raise BenchError(f"could not read h2load's output:\n{text[-800:]}")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    done = int(succeeded.group(1))
    status = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
    if codes is not None:
        status = dict(zip(status, map(int, codes.groups()), strict=True))
    return LoadResult(
        count=done,
        seconds=seconds,
        rps=float(rate.group(1)),
        p50_ms=None,
        p95_ms=None,
        p99_ms=None,
        mean_ms=float(latency.group(5)) * scale[latency.group(6)] if latency else None,
        codes={("OK" if k == "2xx" else k): v for k, v in status.items() if v} | (
            {"failed": int(succeeded.group(3)) + int(succeeded.group(4))}
            if int(succeeded.group(3)) + int(succeeded.group(4)) else {}
        ),
    )


# --------------------------------------------------------------------------------------------
# A private Redis


@dataclass
class RedisServer:
    """A ``redis-server`` on a free loopback port, without persistence; ``stop()`` ends it."""

    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, workdir: Path, timeout: float = 10.0) -> RedisServer:
        """Start one and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise BenchError("redis-server not found: run `make deps`")
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        with (workdir / "redis.log").open("wb") as log:
            process = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(workdir), "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        server = cls(process, port)
        deadline = time.monotonic() + timeout
        while not server.ping():
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise BenchError(f"redis-server did not start; see {workdir / 'redis.log'}")
            time.sleep(0.02)
        return server

    def ping(self) -> bool:
        """Whether it answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Terminate it (SIGKILL after 5 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# --------------------------------------------------------------------------------------------
# Self-contained HTML: no scripts, no external assets


PAGE_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1180px;color:#1d232a;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0 16px;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid #dde2e8;padding:4px 9px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}th{background:#f3f5f8}
.pass{color:#137333;font-weight:600}.fail{color:#b3261e;font-weight:600}.skip{color:#6b7280}
.note{color:#4b5563;font-size:13px}code{background:#f3f5f8;padding:1px 4px;border-radius:3px}
svg text{font:12px system-ui,sans-serif}
"""


def esc(value: object) -> str:
    """HTML-escaped text."""
    return html.escape(str(value))


def html_page(title: str, body: str) -> str:
    """A complete page with inline styles."""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n")


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], raw_columns: Sequence[int] = ()) -> str:
    """A table; cells in ``raw_columns`` are inserted as HTML (already escaped by the caller)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell if i in raw_columns else esc(cell)}</td>" for i, cell in enumerate(row))
        + "</tr>\n" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def svg_bars(title: str, bars: Sequence[tuple[str, float | None]], unit: str, *,
             limit: float | None = None, limit_label: str = "", colors: Sequence[str] = ()) -> str:
    """A horizontal bar chart as inline SVG; an optional vertical line marks a budget or target."""
    shown = [(label, value) for label, value in bars if value is not None]
    if not shown:
        return ""
    label_width, chart_width, row = 260, 560, 22
    top = max([v for _, v in shown] + ([limit] if limit else [])) or 1.0
    height = row * len(shown) + 34
    parts = [f'<svg width="{label_width + chart_width + 90}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><text x="0" y="14" font-weight="600">{esc(title)}</text>']
    for i, (label, value) in enumerate(shown):
        y = 24 + i * row
        width = max(1.0, chart_width * value / top)
        color = colors[i] if i < len(colors) and colors[i] else "#3b6fd4"
        parts.append(f'<text x="0" y="{y + 14}">{esc(label)}</text>'
                     f'<rect x="{label_width}" y="{y + 3}" width="{width:.1f}" height="{row - 7}" fill="{color}"/>'
                     f'<text x="{label_width + width + 6:.1f}" y="{y + 14}">{value:,.4g} {esc(unit)}</text>')
    if limit:
        x = label_width + chart_width * limit / top
        parts.append(f'<line x1="{x:.1f}" y1="20" x2="{x:.1f}" y2="{height - 4}" stroke="#b3261e" '
                     f'stroke-dasharray="4 3"/><text x="{x + 4:.1f}" y="{height - 4}" fill="#b3261e">'
                     f'{esc(limit_label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def new_run_dir(parent: Path, name: str) -> Path:
    """A fresh directory ``parent/name`` (``name-2``, ``-3``... when two runs start in one second)."""
    for attempt in range(1, 100):
        candidate = parent / (name if attempt == 1 else f"{name}-{attempt}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        return candidate
    raise BenchError(f"cannot make a run directory under {parent}")


def publish_report(run_dir: Path, latest: Path) -> None:
    """Copy ``run_dir`` to ``latest`` (a copy, not a symlink: git ignores ``latest/`` as a directory)."""
    if latest.exists():
        shutil.rmtree(latest)
    shutil.copytree(run_dir, latest)
