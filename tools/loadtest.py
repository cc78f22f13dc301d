"""Load-test runner: start the stack, seed it, run ghz scenarios, write a report with a verdict.

``python tools/loadtest.py`` (``make loadtest``) does, in order:

1. reads the scenarios, one ghz config each, from ``ghz-loadtests/configs/*.json`` (see
   ``ghz-loadtests/README.md``): ghz's own keys plus a ``fittracker`` block with the service, the
   targets (``edge``: native gRPC through Envoy; ``direct``: one replica's port), the budget (p99,
   error rate) and whether the data is single-use;
2. starts Redis and the stack (``tools.devstack.Stack``: every present service behind Envoy, on
   free ports, embedded store), or uses a running one (``--edge``/``--direct``);
3. seeds accounts (an admin whose token reads any user's data, and N users) and each present
   service's resources, through the API (``tools/loadtest_seed.py``);
4. runs each scenario on each target with ghz, one progress line per run;
5. writes ``ghz-loadtests/reports/<timestamp>-<profile>/`` (copied to ``reports/latest/``): ghz's
   JSON and HTML per run, ``report.json``, ``report.html`` (tables and inline SVG charts, no
   scripts) and ``summary.txt``, with a verdict per run against its budget, the edge's added
   latency per scenario, and ratios to the recorded baseline (``ghz-loadtests/baselines/``).

The exit status is 0 when every run passed, 1 when one failed, 2 when the run could not be made.
Scenarios of services that do not exist yet are listed as skipped.

Profiles: ``full`` runs the configs as written (the lead's measurement, on a quiet machine);
``quick`` caps every run at 5 s; ``smoke`` sends a few calls per run at low rate (the test suite's
check that the paths work, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tools import envoy_config
from tools.bench_common import (
    PROTOSET,
    ROOT,
    BenchError,
    LoadResult,
    Progress,
    RedisServer,
    esc,
    expected_seconds,
    format_duration,
    ghz_html,
    ghz_report_binary,
    git_commit,
    html_page,
    html_table,
    machine,
    new_run_dir,
    parse_duration,
    publish_report,
    require_ghz,
    run_ghz,
    svg_bars,
    write_json,
)

# _die_with_parent: the same prctl guard as the stack's own children, so none outlives this process.
from tools.devstack import Child, Stack, StackError, _die_with_parent, present_services
from tools.envoy_config import Limit
from tools.loadtest_seed import ADMIN_EMAIL, Seeder, SeedResult

LOADTESTS = ROOT / "ghz-loadtests"
CONFIGS = LOADTESTS / "configs"
BASELINES = LOADTESTS / "baselines"
REPORTS = LOADTESTS / "reports"
Profile = Literal["full", "quick", "smoke"]
PROFILES: tuple[Profile, ...] = ("full", "quick", "smoke")
TARGETS = ("edge", "direct")
#: Every key ghz 0.93's config file accepts (runner/config.go); anything else is a typo ghz would ignore.
GHZ_KEYS = frozenset({
    "proto", "protoset", "call", "cacert", "cert", "key", "count-errors", "skipTLS", "skipFirst", "cname",
    "authority", "insecure", "total", "async", "concurrency", "concurrency-schedule", "concurrency-start",
    "concurrency-end", "concurrency-step", "concurrency-step-duration", "concurrency-max-duration",
    "connections", "rps", "duration", "duration-stop", "max-duration", "timeout", "data", "data-file",
    "binary-file", "metadata", "metadata-file", "stream-interval", "stream-call-duration", "stream-call-count",
    "stream-dynamic-messages", "output", "format", "connect-timeout", "keepalive", "cpus", "import-paths", "name",
    "tags", "reflect-metadata", "debug", "host", "enable-compression", "load-schedule", "load-start", "load-end",
    "load-step", "load-step-duration", "load-max-duration", "lb-strategy",
})
#: Keys the runner sets for each run, so a config must not.
RUNNER_KEYS = frozenset({"host", "output", "format", "name", "tags"})
PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
KNOWN_PLACEHOLDERS = frozenset({"seed", "admin_token"})
QUICK_SECONDS = 5.0
SMOKE_CALLS = 12
SMOKE_RPS = 40
#: Below this share of the offered rate, a run's latencies do not describe the stated load.
MIN_SUSTAINED_SHARE = 0.9
#: Baseline ratios beyond these are flagged as regressions (noise on a shared machine is ~10-20 %).
REGRESSION_RPS_RATIO = 0.8
REGRESSION_P99_RATIO = 1.25


class ConfigError(ValueError):
    """A scenario config is invalid; the message names the file and the field."""


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Budget:
    """What a run must meet to pass."""

    p99_ms: float
    max_error_rate: float


@dataclass(frozen=True)
class Scenario:
    """One ghz config and what the runner needs to know about it."""

    name: str
    path: Path
    service: str
    summary: str
    targets: tuple[str, ...]
    budget: Budget
    allowed_codes: tuple[str, ...]
    single_use: bool
    smoke: bool
    ghz: Mapping[str, Any]

    @property
    def data_sets(self) -> set[str]:
        """The seed data sets the config reads (``${seed}/<name>.json``)."""
        return set(re.findall(r"\$\{seed\}/([a-z0-9-]+)\.json", json.dumps(self.ghz)))


def load_scenario(path: Path) -> Scenario:
    """Read and check one scenario file."""
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path.name}: not JSON: {error}") from None
    meta = document.pop("fittracker", None)
    if not isinstance(meta, dict):
        raise ConfigError(f"{path.name}: needs a \"fittracker\" block (service, summary, targets, budget)")
    check_ghz_keys(path, document)
    service = meta.get("service")
    if service not in envoy_config.BASE_PORTS:
        raise ConfigError(f"{path.name}: fittracker.service must be one of {list(envoy_config.BASE_PORTS)}")
    targets = tuple(meta.get("targets", ()))
    if not targets or set(targets) - set(TARGETS):
        raise ConfigError(f"{path.name}: fittracker.targets must be a non-empty subset of {list(TARGETS)}")
    budget = meta.get("budget") or {}
    try:
        parsed_budget = Budget(float(budget["p99_ms"]), float(budget["max_error_rate"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path.name}: fittracker.budget needs p99_ms and max_error_rate numbers") from None
    single_use = bool(meta.get("single_use", False))
    if single_use and ("duration" in document or len(targets) != 1 or "total" not in document):
        raise ConfigError(f"{path.name}: single-use data needs one target and a total, not a duration "
                          "(each record can be sent once)")
    if not ("duration" in document or "total" in document):
        raise ConfigError(f"{path.name}: needs a duration or a total, so every run is bounded")
    allowed = tuple(meta.get("allowed_codes", ()))
    if allowed and not meta.get("allowed_codes_why"):
        raise ConfigError(f"{path.name}: allowed_codes needs allowed_codes_why")
    parse_duration(document.get("duration"))
    return Scenario(
        name=path.stem, path=path, service=service, summary=str(meta.get("summary", "")), targets=targets,
        budget=parsed_budget, allowed_codes=allowed, single_use=single_use, smoke=bool(meta.get("smoke", False)),
        ghz=document,
    )


def check_ghz_keys(path: Path, document: Mapping[str, Any]) -> None:
    """Refuse keys ghz does not know or the runner sets, a missing call, unknown placeholders."""
    unknown = set(document) - GHZ_KEYS
    if unknown:
        raise ConfigError(f"{path.name}: not ghz config keys: {sorted(unknown)} (ghz would silently ignore them)")
    if "max-duration" in document:
        # ghz 0.93 reads max-duration from a config file as a plain duration and drops total.
        raise ConfigError(f"{path.name}: max-duration is not honoured with total in ghz 0.93 config files; "
                          "the runner bounds every run's time itself")
    runner_owned = set(document) & RUNNER_KEYS
    if runner_owned:
        raise ConfigError(f"{path.name}: {sorted(runner_owned)} are set by the runner for each run")
    if "call" not in document:
        raise ConfigError(f"{path.name}: no \"call\"")
    for name in PLACEHOLDER.findall(json.dumps(document)):
        if name not in KNOWN_PLACEHOLDERS:
            raise ConfigError(f"{path.name}: unknown placeholder ${{{name}}} (known: {sorted(KNOWN_PLACEHOLDERS)})")


def load_scenarios(directory: Path = CONFIGS) -> list[Scenario]:
    """Every scenario, reads first and single-use pools last (a pool spent early changes nothing else)."""
    scenarios = [load_scenario(path) for path in sorted(directory.glob("*.json"))]
    return sorted(scenarios, key=lambda s: (s.single_use, s.name))


def substitute(value: Any, values: Mapping[str, str]) -> Any:
    """``value`` with every ``${name}`` in its strings replaced."""
    if isinstance(value, str):
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], value)
    if isinstance(value, list):
        return [substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, values) for k, v in value.items()}
    return value


def effective_config(scenario: Scenario, *, host: str, target: str, profile: Profile,
                     values: Mapping[str, str], pool_size: int | None) -> dict[str, Any]:
    """The ghz config of one run: placeholders filled, the profile applied, the runner's keys set."""
    config: dict[str, Any] = substitute(copy.deepcopy(dict(scenario.ghz)), values)
    protoset = Path(config.get("protoset") or PROTOSET)
    config["protoset"] = str(protoset if protoset.is_absolute() else ROOT / protoset)
    config.update(host=host, insecure=True, name=f"{scenario.name}@{target}",
                  tags={"scenario": scenario.name, "target": target, "profile": profile})
    if scenario.single_use and pool_size is not None:
        config["total"] = min(int(config["total"]), pool_size)
    if profile == "quick" and "duration" in config:
        config["duration"] = format_duration(min(parse_duration(config["duration"]), QUICK_SECONDS))
    elif profile == "smoke":
        config.pop("duration", None)
        config["total"] = min(int(config.get("total", SMOKE_CALLS)), SMOKE_CALLS)
        config["concurrency"] = min(int(config.get("concurrency", 1)), 2)
        config["connections"] = 1
        config["rps"] = min(int(config.get("rps") or SMOKE_RPS), SMOKE_RPS)
    if "duration" in config:
        # Calls still in flight when the duration ends are cut off by ghz; counted, they would show
        # up as CANCELLED/UNAVAILABLE errors that no client saw. "ignore" leaves them out.
        config.setdefault("duration-stop", "ignore")
    return config


# --------------------------------------------------------------------------------------------
# The stack, with its processes' output in files rather than pumped through this process


@dataclass
class FileChild(Child):
    """A stack process writing to log files (or nowhere) instead of pipes read by this process.

    Under load the services and Envoy write thousands of lines a second; pumped through Python
    threads here they would take CPU from the processes under test, and a slow reader would
    block the writers. Files cost the writer only.
    """

    stdout_path: Path | None = None
    stderr_path: Path | None = None

    def start(self) -> None:
        """Start the process with its output in the files (``None``: discarded)."""
        self.tail.clear()
        outputs = [path.open("ab") if path is not None else subprocess.DEVNULL
                   for path in (self.stdout_path, self.stderr_path)]
        try:
            self.process = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                stdout=outputs[0], stderr=outputs[1],
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only calls prctl, safe before exec
            )
        finally:
            for output in outputs:
                if not isinstance(output, int):
                    output.close()

    def failure(self, what: str) -> StackError:
        """As Child.failure, with the last lines of the log files."""
        lines: list[str] = []
        for path in (self.stdout_path, self.stderr_path):
            if path is not None and path.exists():
                lines += path.read_text(errors="replace").splitlines()[-15:]
        self.tail[:] = lines
        return super().failure(what)


def quiet_stack(stack: Stack, logs: Path | None, keep_access_log: bool) -> Stack:
    """Swap the stack's processes for file-logged ones; ``logs=None`` discards all their output.

    Envoy's access log (its stdout) is discarded unless ``keep_access_log``: under load it is
    hundreds of MB, and writing it is Envoy's cost whether the bytes land in a file or nowhere.
    """
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)

    def swap(child: Child, stdout: Path | None, stderr: Path | None) -> FileChild:
        return FileChild(child.name, child.argv, child.env, child.cwd, child.sink,
                         stdout_path=stdout, stderr_path=stderr)

    def file(name: str) -> Path | None:
        return logs / name if logs is not None else None

    stack.edge.child = swap(stack.edge.child, file("envoy-access.log") if keep_access_log else None,
                            file("envoy.log"))
    for replica in stack.replicas:
        log = file(f"{replica.child.name}.log")
        replica.child = swap(replica.child, log, log)
    return stack


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class Run:
    """One scenario on one target, and what came of it."""

    scenario: Scenario
    target: str
    verdict: Literal["PASS", "FAIL", "SKIP", "ERROR"] = "SKIP"
    reasons: list[str] = field(default_factory=list)
    result: LoadResult | None = None
    offered_rps: float = 0.0
    ghz_json: str = ""
    ghz_html: str = ""
    baseline: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        """``scenario@target``."""
        return f"{self.scenario.name}@{self.target}"

    def judge(self, profile: Profile) -> None:
        """Set the verdict from the result and the scenario's budget."""
        assert self.result is not None
        budget, result = self.scenario.budget, self.result
        rate = result.error_rate(self.scenario.allowed_codes)
        reasons = []
        if result.count == 0:
            reasons.append("no call completed")
        if rate > budget.max_error_rate:
            bad = {c: n for c, n in result.codes.items() if c != "OK" and c not in self.scenario.allowed_codes}
            reasons.append(f"error rate {rate:.2%} > {budget.max_error_rate:.2%} ({bad})")
        if result.p99_ms is None and result.count:
            reasons.append("no successful call to measure")
        # A smoke run checks that each path works: a dozen calls on a busy machine say nothing about
        # latency or sustained rate, so only the measurement profiles judge those.
        if profile != "smoke":
            if result.p99_ms is not None and result.p99_ms > budget.p99_ms:
                reasons.append(f"p99 {result.p99_ms:.1f} ms > {budget.p99_ms:g} ms")
            if self.offered_rps and result.rps < MIN_SUSTAINED_SHARE * self.offered_rps:
                reasons.append(f"sustained {result.rps:.0f} of {self.offered_rps:.0f} rps offered")
        self.reasons = reasons
        self.verdict = "FAIL" if reasons else "PASS"


@dataclass
class Targets:
    """Where the edge and each service's direct port are."""

    edge: str
    direct: dict[str, str]
    services: list[str]


def select(scenarios: Sequence[Scenario], patterns: Sequence[str], services: Sequence[str],
           targets: Sequence[str], smoke_only: bool) -> Iterator[tuple[Scenario, str]]:
    """The (scenario, target) pairs the options ask for."""
    for scenario in scenarios:
        if services and scenario.service not in services:
            continue
        if smoke_only and not scenario.smoke:
            continue
        for target in scenario.targets:
            if target not in targets:
                continue
            key = f"{scenario.name}@{target}"
            if patterns and not any(fnmatch.fnmatch(key, p) or fnmatch.fnmatch(scenario.name, p) for p in patterns):
                continue
            yield scenario, target


def pool_size(seed: SeedResult, scenario: Scenario) -> int | None:
    """How many records the scenario's (first) data set holds."""
    sizes = [seed.sizes[name] for name in scenario.data_sets if name in seed.sizes]
    return min(sizes) if sizes else None


def execute(runs: list[Run], targets: Targets, seed: SeedResult | None, profile: Profile, run_dir: Path,
            progress: Progress, converter: Path | None, keep_details: bool) -> None:
    """Run every runnable scenario in order, filling in each Run."""
    values = {"seed": str(seed.directory) if seed else "", "admin_token": seed.admin_token if seed else ""}
    for index, run in enumerate(runs, 1):
        label = f"[{index}/{len(runs)}] {run.key:<38}"
        scenario = run.scenario
        skip = why_skip(run, targets, seed)
        if skip:
            run.verdict, run.reasons = "SKIP", [skip]
            progress.note(f"{label}  skipped: {skip}")
            continue
        host = targets.edge if run.target == "edge" else targets.direct[scenario.service]
        assert seed is not None
        config = effective_config(scenario, host=host, target=run.target, profile=profile, values=values,
                                  pool_size=pool_size(seed, scenario))
        run.offered_rps = float(config.get("rps") or 0)
        progress.start(label, expected_seconds(config))
        try:
            run.result, json_path = run_ghz(config, run_dir / "ghz", run.key, progress=progress,
                                            keep_details=keep_details)
        except BenchError as error:
            run.verdict, run.reasons = "ERROR", [str(error)]
            progress.done(f"ERROR {error}")
            continue
        run.ghz_json = str(json_path.relative_to(run_dir))
        html_path = ghz_html(converter, json_path)
        run.ghz_html = str(html_path.relative_to(run_dir)) if html_path else ""
        run.judge(profile)
        progress.done(one_line(run))
        # Lets queues and connections settle, so one run's tail does not land in the next one's head.
        time.sleep(0.5 if profile == "smoke" else 2.0)


def why_skip(run: Run, targets: Targets, seed: SeedResult | None) -> str:
    """Why a run cannot be made, or "" when it can."""
    scenario = run.scenario
    if scenario.service not in targets.services:
        return f"the {scenario.service} service does not exist yet"
    if run.target == "direct" and scenario.service not in targets.direct:
        return f"no direct address for {scenario.service} (--direct {scenario.service}=HOST:PORT)"
    if seed is None:
        return "nothing was seeded"
    problem = seed.problems.get(scenario.service)
    missing = [name for name in scenario.data_sets if name not in seed.files]
    if missing:
        reasons = [seed.problems.get(name) or problem or "not made" for name in missing]
        return f"seed data {missing} missing: {'; '.join(reasons)}"
    return ""


def one_line(run: Run) -> str:
    """The result of a run in one line."""
    r = run.result
    if r is None:
        return run.verdict
    p = " ".join(f"{name} {value:7.2f} ms" if value is not None else f"{name}     n/a" for name, value in
                 (("p50", r.p50_ms), ("p95", r.p95_ms), ("p99", r.p99_ms)))
    errors = r.error_rate(run.scenario.allowed_codes)
    why = f"  ({'; '.join(run.reasons)})" if run.reasons else ""
    return f"{r.count:>7} calls {r.rps:8.1f} rps  {p}  err {errors:6.2%}  {run.verdict}{why}"


# --------------------------------------------------------------------------------------------
# Baselines and reports


def baseline_path(profile: Profile) -> Path:
    """Where the baseline of a profile is recorded."""
    return BASELINES / f"{profile}.json"


def compare(runs: Sequence[Run], profile: Profile) -> dict[str, Any] | None:
    """Attach baseline ratios to each run; the baseline's metadata, or None when there is none."""
    path = baseline_path(profile)
    if not path.exists():
        return None
    baseline = json.loads(path.read_text())
    for run in runs:
        recorded = baseline.get("runs", {}).get(run.key)
        if run.result is None or not recorded:
            continue
        ratios: dict[str, Any] = {"recorded": recorded}
        if recorded.get("rps"):
            ratios["rps_ratio"] = run.result.rps / recorded["rps"]
        for p in ("p50_ms", "p99_ms"):
            now, then = getattr(run.result, p), recorded.get(p)
            if now is not None and then:
                ratios[f"{p.removesuffix('_ms')}_ratio"] = now / then
        ratios["regression"] = (ratios.get("rps_ratio", 1.0) < REGRESSION_RPS_RATIO
                                or ratios.get("p99_ratio", 1.0) > REGRESSION_P99_RATIO)
        run.baseline = ratios
    return {k: v for k, v in baseline.items() if k != "runs"}


def record_baseline(runs: Sequence[Run], profile: Profile, meta: Mapping[str, Any], note: str) -> Path:
    """Write this run's figures as the profile's baseline."""
    path = baseline_path(profile)
    write_json(path, {
        **meta,
        "note": note,
        "runs": {
            run.key: {
                "rps": round(run.result.rps, 1),
                "p50_ms": _round(run.result.p50_ms), "p95_ms": _round(run.result.p95_ms),
                "p99_ms": _round(run.result.p99_ms),
                "error_rate": round(run.result.error_rate(run.scenario.allowed_codes), 5),
                "offered_rps": run.offered_rps,
                "verdict": run.verdict,
            }
            for run in runs if run.result is not None
        },
    })
    return path


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def edge_costs(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """For scenarios run on both targets: what going through the edge added."""
    by_key = {run.key: run for run in runs if run.result is not None and run.result.p50_ms is not None}
    rows = []
    for run in runs:
        if run.target != "edge" or run.key not in by_key:
            continue
        direct = by_key.get(f"{run.scenario.name}@direct")
        if direct is None or direct.result is None or run.result is None:
            continue
        edge_r, direct_r = run.result, direct.result
        rows.append({
            "scenario": run.scenario.name,
            "p50_added_ms": (edge_r.p50_ms or 0) - (direct_r.p50_ms or 0),
            "p99_added_ms": (edge_r.p99_ms or 0) - (direct_r.p99_ms or 0),
            "rps_edge_over_direct": edge_r.rps / direct_r.rps if direct_r.rps else None,
        })
    return rows


def run_record(run: Run) -> dict[str, Any]:
    """A run as report.json holds it."""
    return {
        "scenario": run.scenario.name,
        "target": run.target,
        "service": run.scenario.service,
        "summary": run.scenario.summary,
        "call": run.scenario.ghz["call"],
        "verdict": run.verdict,
        "reasons": run.reasons,
        "budget": {"p99_ms": run.scenario.budget.p99_ms, "max_error_rate": run.scenario.budget.max_error_rate,
                   "allowed_codes": list(run.scenario.allowed_codes)},
        "offered_rps": run.offered_rps,
        "result": run.result.as_dict() if run.result else None,
        "error_rate": run.result.error_rate(run.scenario.allowed_codes) if run.result else None,
        "ghz_json": run.ghz_json,
        "ghz_html": run.ghz_html,
        "baseline": run.baseline,
    }


def summary_table(runs: Sequence[Run]) -> str:
    """The plain-text table printed at the end and saved as summary.txt."""
    header = (f"{'run':<40} {'offered':>8} {'rps':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'budget':>7} "
              f"{'errors':>7}  {'vs base':>8}  verdict")
    lines = [header, "-" * len(header)]
    for run in runs:
        r = run.result
        base = run.baseline or {}
        ratio = f"p99x{base['p99_ratio']:.2f}" if "p99_ratio" in base else ""
        if r is None:
            lines.append(f"{run.key:<40} {'':>8} {'':>8} {'':>8} {'':>8} {'':>8} {'':>7} {'':>7}  {'':>8}  "
                         f"{run.verdict}: {'; '.join(run.reasons)}")
            continue
        cells = [f"{v:8.2f}" if v is not None else f"{'n/a':>8}" for v in (r.p50_ms, r.p95_ms, r.p99_ms)]
        lines.append(
            f"{run.key:<40} {run.offered_rps or 0:8.0f} {r.rps:8.1f} {' '.join(cells)} "
            f"{run.scenario.budget.p99_ms:7.0f} {r.error_rate(run.scenario.allowed_codes):7.2%}  {ratio:>8}  "
            f"{run.verdict}{': ' + '; '.join(run.reasons) if run.reasons else ''}"
        )
    return "\n".join(lines)


def render_html(report: Mapping[str, Any], runs: Sequence[Run]) -> str:
    """report.html: the settings, the verdicts, the table, the charts, the edge's cost, the baseline."""
    meta = report["meta"]
    counts = report["verdicts"]
    parts = [
        f"<p>{esc(meta['started'])} &middot; commit <code>{esc(meta['commit'])}</code> &middot; profile "
        f"<b>{esc(meta['profile'])}</b> &middot; {esc(meta['machine']['cpus'])} CPUs, load average at start "
        f"{esc(meta['machine']['loadavg_at_start'])}</p>",
        f"<p class=note>Stack: {esc(meta['stack'])}</p>",
        "<p>" + " &middot; ".join(f"<span class={v.lower() if v != 'ERROR' else 'fail'}>{esc(v)}: {n}</span>"
                                  for v, n in counts.items()) + "</p>",
        "<p class=note>Latencies are of successful calls, measured by ghz on the same machine as the stack: on "
        "2 cores the load generator takes CPU from the services, so read these as figures at the stated "
        "offered load (the <i>offered</i> column), not as capacity. Capacity and ratios are in the bench report."
        "</p>",
    ]
    rows = []
    for run in runs:
        r = run.result
        verdict = f"<span class={run.verdict.lower() if run.verdict != 'ERROR' else 'fail'}>{esc(run.verdict)}</span>"
        if run.reasons:
            verdict += f" <span class=note>{esc('; '.join(run.reasons))}</span>"
        links = " ".join(f'<a href="{esc(p)}">{label}</a>' for label, p in (("html", run.ghz_html),
                                                                             ("json", run.ghz_json)) if p)
        base = run.baseline or {}
        ratio = " ".join(f"{k.removesuffix('_ratio')}&times;{base[k]:.2f}" for k in ("rps_ratio", "p99_ratio")
                         if k in base)
        if base.get("regression"):
            ratio = f"<span class=fail>{ratio}</span>"
        if r is None:
            rows.append([run.key, "", "", "", "", "", f"{run.scenario.budget.p99_ms:g}", "", verdict, "", links])
            continue
        codes = ", ".join(f"{c}: {n}" for c, n in sorted(r.codes.items()))
        rows.append([
            run.key, f"{run.offered_rps:g}" if run.offered_rps else "max", f"{r.rps:,.1f}",
            *(f"{v:.2f}" if v is not None else "n/a" for v in (r.p50_ms, r.p95_ms, r.p99_ms)),
            f"{run.scenario.budget.p99_ms:g}", esc(codes), verdict, ratio, links,
        ])
    parts.append("<h2>Runs</h2>")
    parts.append(html_table(["run", "offered rps", "rps", "p50 ms", "p95 ms", "p99 ms", "p99 budget",
                             "status codes", "verdict", "vs baseline", "ghz"], rows, raw_columns=(7, 8, 9, 10)))
    measured = [run for run in runs if run.result is not None]
    parts.append(svg_bars("Throughput achieved (calls/s)", [(run.key, run.result.rps if run.result else None)
                                                            for run in measured], "rps"))
    parts.append("<br>")
    parts.append(svg_bars(
        "p99 latency (ms); red: over its budget",
        [(run.key, run.result.p99_ms if run.result else None) for run in measured], "ms",
        colors=["#b3261e" if run.result and run.result.p99_ms and run.result.p99_ms > run.scenario.budget.p99_ms
                else "" for run in measured],
    ))
    if report["edge_cost"]:
        parts.append("<h2>What the edge adds</h2><p class=note>Same scenario, same offered load, through Envoy "
                     "versus straight to a replica's port.</p>")
        parts.append(html_table(["scenario", "p50 added ms", "p99 added ms", "rps edge/direct"], [
            [row["scenario"], f"{row['p50_added_ms']:+.2f}", f"{row['p99_added_ms']:+.2f}",
             f"{row['rps_edge_over_direct']:.2f}" if row["rps_edge_over_direct"] else ""]
            for row in report["edge_cost"]
        ]))
    baseline = report.get("baseline")
    parts.append("<h2>Baseline</h2>")
    if baseline:
        parts.append(f"<p class=note>Compared with <code>{esc(baseline_path(meta['profile']).relative_to(ROOT))}"
                     f"</code> recorded {esc(baseline.get('started', '?'))} at {esc(baseline.get('commit', '?'))}"
                     f": {esc(baseline.get('note', ''))}. Flagged red: rps below &times;{REGRESSION_RPS_RATIO} "
                     f"or p99 above &times;{REGRESSION_P99_RATIO}.</p>")
    else:
        parts.append("<p class=note>No baseline recorded for this profile: run with <code>--record-baseline</code>"
                     " on a quiet machine and commit the file.</p>")
    parts.append("<h2>Scenarios</h2>")
    seen: set[str] = set()
    scenario_rows = []
    for run in runs:
        if run.scenario.name in seen:
            continue
        seen.add(run.scenario.name)
        scenario_rows.append([run.scenario.name, run.scenario.ghz["call"].split(".")[-1], run.scenario.summary])
    parts.append(html_table(["scenario", "call", "what it does"], scenario_rows))
    return html_page("FitTracker load test", "\n".join(parts))


# --------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=PROFILES, default="full", help="full (default), quick, or smoke")
    parser.add_argument("--scenario", action="append", default=[],
                        help="run only matching scenarios (glob on name or name@target; repeatable)")
    parser.add_argument("--service", action="append", default=[],
                        help="only this service's scenarios, and start only these services (repeatable)")
    parser.add_argument("--target", action="append", choices=TARGETS, default=[], help="only edge or direct runs")
    parser.add_argument("--smoke-only", action="store_true", help="only scenarios marked smoke")
    parser.add_argument("--users", type=int, default=None, help="accounts to seed (default 200; 6 for smoke)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="replicas per service (default 1, so edge and direct runs have the same backend)")
    parser.add_argument("--no-redis", action="store_true", help="run the services without Redis")
    parser.add_argument("--service-log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    parser.add_argument("--access-log", action="store_true",
                        help="keep Envoy's access log (logs/envoy-access.log; large under load)")
    parser.add_argument("--edge-rate-limit", type=int, default=1_000_000,
                        help="the edge's token bucket in rps: on, but high enough not to shed the test's load")
    parser.add_argument("--cheap-passwords", action="store_true",
                        help="argon2 at test cost (1 MiB, 1 pass): fast seeding; Login then measures nothing real")
    parser.add_argument("--edge", help="use a running stack: its edge HOST:PORT (then nothing is started)")
    parser.add_argument("--direct", action="append", default=[], metavar="SERVICE=HOST:PORT",
                        help="with --edge: a service's direct address (repeatable)")
    parser.add_argument("--report-dir", type=Path, default=REPORTS,
                        help="where runs go (default ghz-loadtests/reports)")
    parser.add_argument("--no-ghz-html", action="store_true", help="skip ghz's own HTML pages")
    parser.add_argument("--keep-details", action="store_true", help="keep every call's detail in ghz's JSON")
    parser.add_argument("--record-baseline", action="store_true",
                        help="write this run as ghz-loadtests/baselines/<profile>.json")
    parser.add_argument("--baseline-note", default="", help="why this baseline (machine state, what changed)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 on a flagged baseline regression")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser.parse_args(argv)


class Environment:
    """The stack (and Redis) a run targets: started here, or a running one named by ``--edge``."""

    def __init__(self, args: argparse.Namespace, logs: Path, progress: Progress) -> None:
        """Nothing starts before ``open()``."""
        self._args = args
        self._logs = logs
        self._progress = progress
        self._data_dir = Path(tempfile.mkdtemp(prefix="fittracker-loadtest-"))
        self.stack: Stack | None = None
        self.redis: RedisServer | None = None
        self.description = ""

    def open(self) -> tuple[Targets, dict[str, str]]:
        """Start what is needed; the targets of the runs and where to send seeding calls."""
        args = self._args
        present = present_services()
        if args.edge:
            direct = parse_direct(args.direct)
            self.description = f"external: edge {args.edge}, direct {direct or 'none'}"
            return Targets(args.edge, direct, present), {s: direct.get(s, args.edge) for s in present}
        env = {
            "FITTRACKER_LOG_LEVEL": args.service_log_level,
            "FITTRACKER_ADMIN_EMAILS": ADMIN_EMAIL,
            # Seeded tokens must outlive the whole run; 3600 s is the longest the settings allow.
            "FITTRACKER_ACCESS_TOKEN_TTL_SECONDS": "3600",
        }
        if args.cheap_passwords:
            env |= {"FITTRACKER_ARGON2_MEMORY_KIB": "1024", "FITTRACKER_ARGON2_TIME_COST": "1"}
        if not args.no_redis:
            self.redis = RedisServer.start(self._data_dir / "redis")
            env["FITTRACKER_REDIS_URL"] = self.redis.url
        limit = args.edge_rate_limit
        self.stack = quiet_stack(
            Stack(self._data_dir / "stack", services=args.service or None, replicas=args.replicas,
                  use_free_ports=True, service_env=env, rate_limit_rps=limit,
                  # One address and one admin token stand for many clients: lift the per-client quotas
                  # (still evaluated, so their cost stays in the measurement).
                  ip_limit=Limit(limit), user_limit=Limit(limit), sink=self._progress.note),
            self._logs, args.access_log,
        )
        stack = self.stack
        self._progress.note(f"[stack] starting {', '.join(stack.services)} ({args.replicas} replica(s) each) + Envoy")
        stack.start(timeout=90)
        direct = {s: str(stack.replica(s, 0).address) for s in stack.services}
        self.description = (
            f"started here: {', '.join(stack.services)}, {args.replicas} replica(s) each, edge {stack.edge_target}, "
            f"embedded store, Redis {'on' if self.redis else 'off'}, service log level {args.service_log_level}, "
            f"Envoy access log {'kept' if args.access_log else 'discarded'}, edge rate limits {limit} rps "
            f"(edge-wide, per address, per user), argon2 at {'test' if args.cheap_passwords else 'production'} "
            "cost; direct runs go to replica 0"
        )
        return Targets(stack.edge_target, direct, stack.services), direct

    def close(self) -> None:
        """Stop what was started and remove its data."""
        if self.stack is not None:
            self.stack.stop()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self._data_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``make loadtest``."""
    args = parse_args(argv)
    profile: Profile = args.profile
    try:
        scenarios = load_scenarios()
        require_ghz()
    except (ConfigError, BenchError) as error:
        print(f"loadtest: {error}", file=sys.stderr)
        return 2
    if args.list:
        present = present_services()
        for scenario in scenarios:
            state = "" if scenario.service in present else "  (service not present yet)"
            print(f"{scenario.name:<30} {','.join(scenario.targets):<12} {scenario.summary}{state}")
        return 0
    pairs = list(select(scenarios, args.scenario, args.service, args.target or TARGETS, args.smoke_only))
    if not pairs:
        print("loadtest: no scenario matches the options (see --list)", file=sys.stderr)
        return 2
    users = args.users if args.users is not None else (6 if profile == "smoke" else 200)
    started = datetime.now(UTC)
    run_dir = new_run_dir(args.report_dir, f"{started:%Y%m%d-%H%M%S}-{profile}")
    progress = Progress()
    progress.note(f"loadtest: {len(pairs)} runs, profile {profile}, report in {_display(run_dir)}")
    runs = [Run(scenario, target) for scenario, target in pairs]
    meta: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "commit": git_commit(),
                            "profile": profile, "machine": machine(), "users": users}
    converter = None if args.no_ghz_html else ghz_report_binary(progress.note)
    environment = Environment(args, run_dir / "logs", progress)
    code = 2
    try:
        targets, seed_addresses = environment.open()
        seed = asyncio.run(_seed(Seeder(seed_addresses, run_dir / "seed", progress.note), users))
        execute(runs, targets, seed, profile, run_dir, progress, converter, args.keep_details)
        code = 0
    except (BenchError, OSError, RuntimeError) as error:
        progress.note(f"loadtest: {error}")
        for run in runs:
            if run.result is None and run.verdict == "SKIP" and not run.reasons:
                run.verdict, run.reasons = "ERROR", ["the run stopped before it: see above"]
    except KeyboardInterrupt:
        progress.note("loadtest: interrupted; writing what was measured")
    finally:
        environment.close()
    meta["stack"] = environment.description
    finish(runs, meta, run_dir, args, progress)
    if code:
        return code
    failed = any(run.verdict in ("FAIL", "ERROR") for run in runs)
    regressed = args.fail_on_regression and any(run.baseline and run.baseline.get("regression") for run in runs)
    return 1 if failed or regressed else 0


def finish(runs: Sequence[Run], meta: dict[str, Any], run_dir: Path, args: argparse.Namespace,
           progress: Progress) -> None:
    """Compare with the baseline, write the report files, print the table, record a baseline if asked."""
    profile: Profile = meta["profile"]
    baseline_meta = compare(runs, profile)
    verdicts: dict[str, int] = {}
    for run in runs:
        verdicts[run.verdict] = verdicts.get(run.verdict, 0) + 1
    report = {
        "meta": meta,
        "verdicts": verdicts,
        "runs": [run_record(run) for run in runs],
        "edge_cost": edge_costs(runs),
        "baseline": baseline_meta,
    }
    write_json(run_dir / "report.json", report)
    (run_dir / "report.html").write_text(render_html(report, runs))
    table = summary_table(runs)
    (run_dir / "summary.txt").write_text(table + "\n")
    publish_report(run_dir, args.report_dir / "latest")
    progress.note("\n" + table)
    progress.note(f"\nreport: {_display(run_dir / 'report.html')} (also {_display(args.report_dir / 'latest')})")
    if args.record_baseline:
        path = record_baseline(runs, profile, meta, args.baseline_note)
        progress.note(f"baseline recorded: {_display(path)} (commit it)")


async def _seed(seeder: Seeder, users: int) -> SeedResult:
    # One event loop for the seeder's channels from first call to close.
    try:
        return await seeder.seed(users)
    finally:
        await seeder.close()


def parse_direct(items: Sequence[str]) -> dict[str, str]:
    """``SERVICE=HOST:PORT`` options as a map."""
    direct: dict[str, str] = {}
    for item in items:
        service, sep, address = item.partition("=")
        if not sep or service not in envoy_config.BASE_PORTS:
            raise SystemExit(f"loadtest: --direct wants SERVICE=HOST:PORT with a known service, got {item!r}")
        direct[service] = address
    return direct


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    # Unbuffered-looking progress when piped (make, CI logs).
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
