"""The load-test runner: every scenario config is valid, verdicts follow budgets, and a smoke run
through the real stack (Envoy + the user service) sends a few calls down three paths without an error.

The smoke run checks that the paths work, not how fast they are: a dozen calls per path on a
machine that runs other tests say nothing about latency, and the smoke profile does not judge it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools import envoy_config
from tools.bench_common import LoadResult, ghz_result, h2load_result, parse_duration, require_ghz, svg_bars
from tools.loadtest import (
    SMOKE_CALLS,
    ConfigError,
    Profile,
    Run,
    Scenario,
    effective_config,
    load_scenario,
    load_scenarios,
    main,
)
from tools.loadtest_seed import DATA_SETS

#: Paths the smoke run covers: a public call straight to a replica, an authenticated read through
#: the edge, and a single-use write through the edge (RefreshToken spends each seeded token once).
SMOKE_SCENARIOS = ("user-get-jwks@direct", "user-get-user@edge", "user-refresh-token@edge")


def result(codes: dict[str, int], p99: float | None = 5.0, rps: float = 100.0) -> LoadResult:
    return LoadResult(count=sum(codes.values()), seconds=1.0, rps=rps, p50_ms=1.0, p95_ms=2.0, p99_ms=p99,
                      mean_ms=1.0, codes=codes)


def scenario(name: str = "user-get-user") -> Scenario:
    return next(s for s in load_scenarios() if s.name == name)


def test_every_scenario_config_is_valid_and_seedable() -> None:
    scenarios = load_scenarios()
    assert {s.service for s in scenarios} == set(envoy_config.BASE_PORTS)
    for s in scenarios:
        assert s.data_sets <= set(DATA_SETS), f"{s.name} reads a data set the seeder does not make"
        for data_set in s.data_sets:
            assert DATA_SETS[data_set] in ("user", s.service), f"{s.name} needs another service's data"


def test_configs_with_typos_or_runner_keys_are_refused(tmp_path: Path) -> None:
    base = json.loads((scenario().path).read_text())
    for change, message in (
        ({"concurency": 4}, "not ghz config keys"),
        ({"host": "127.0.0.1:1"}, "set by the runner"),
        ({"metadata": {"authorization": "Bearer ${token}"}}, "unknown placeholder"),
        ({"max-duration": "10s"}, "max-duration"),
    ):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**base, **change}))
        with pytest.raises(ConfigError, match=message):
            load_scenario(path)


def test_the_smoke_profile_sends_a_few_calls_and_single_use_pools_cap_the_count() -> None:
    values = {"seed": "/seed", "admin_token": "t0k3n"}
    smoke = effective_config(scenario(), host="h:1", target="edge", profile="smoke", values=values, pool_size=None)
    assert smoke["total"] == SMOKE_CALLS and "duration" not in smoke
    assert smoke["metadata"]["authorization"] == "Bearer t0k3n"
    assert smoke["data-file"] == "/seed/user-names.json"
    full = effective_config(scenario(), host="h:1", target="edge", profile="full", values=values, pool_size=None)
    assert parse_duration(full["duration"]) >= 10 and full["duration-stop"] == "ignore"
    pool = effective_config(scenario("user-refresh-token"), host="h:1", target="edge", profile="full",
                            values=values, pool_size=37)
    assert pool["total"] == 37


def judged(run: Run, outcome: LoadResult, profile: Profile = "full") -> str:
    run.result = outcome
    run.judge(profile)
    return f"{run.verdict}: {'; '.join(run.reasons)}"


def test_verdicts_follow_the_budget() -> None:
    run = Run(scenario(), "edge", offered_rps=100.0)
    assert judged(run, result({"OK": 1000})) == "PASS: "
    assert judged(run, result({"OK": 1000}, p99=250.0)).startswith("FAIL: p99 250.0 ms > 100 ms")
    assert "Unavailable" in judged(run, result({"OK": 990, "Unavailable": 10}))
    assert "sustained 50 of 100 rps" in judged(run, result({"OK": 1000}, rps=50.0))
    # A smoke run judges errors only.
    assert judged(run, result({"OK": 12}, p99=250.0, rps=5.0), "smoke") == "PASS: "


def test_allowed_codes_are_not_errors() -> None:
    run = Run(scenario("notification-subscribe"), "edge")
    assert judged(run, result({"Canceled": 100}), "smoke") == "PASS: "
    assert judged(run, result({"Canceled": 99, "NotFound": 1}), "smoke").startswith("FAIL")


def test_reports_of_the_load_generators_are_read() -> None:
    ghz = ghz_result({
        "count": 10, "total": 2e9, "average": 3e6, "rps": 5.0,
        "statusCodeDistribution": {"OK": 9, "Unavailable": 1},
        "latencyDistribution": [{"percentage": p, "latency": p * 1e5} for p in (50, 95, 99)],
    })
    assert (ghz.p50_ms, ghz.p99_ms, ghz.error_rate()) == (5.0, 9.9, 0.1)
    h2 = h2load_result(
        "finished in 2.00s, 1500.50 req/s, 1.00MB/s\n"
        "requests: 3001 total, 3001 started, 3001 done, 3000 succeeded, 1 failed, 0 errored, 0 timeout\n"
        "status codes: 3000 2xx, 0 3xx, 1 4xx, 0 5xx\n"
        "time for request:   500us   20.00ms    1.50ms    2.00ms    90.00%\n", 2.0)
    assert (h2.rps, h2.count, h2.codes["OK"], h2.codes["4xx"], h2.mean_ms) == (1500.5, 3001, 3000, 1, 1.5)
    assert "<svg" in svg_bars("t", [("a", 1.0), ("b", None)], "ms", limit=2.0)


@pytest.mark.edge
def test_smoke_run_through_the_real_stack(tmp_path: Path) -> None:
    require_ghz()  # names the fix (make deps) instead of failing on a missing report
    argv = ["--profile", "smoke", "--service", "user", "--cheap-passwords", "--no-ghz-html",
            "--report-dir", str(tmp_path)]
    for name in SMOKE_SCENARIOS:
        argv += ["--scenario", name]
    code = main(argv)
    report = json.loads((tmp_path / "latest" / "report.json").read_text())
    runs = {f"{r['scenario']}@{r['target']}": r for r in report["runs"]}
    assert set(runs) == set(SMOKE_SCENARIOS)
    for key, run in runs.items():
        assert run["verdict"] == "PASS", f"{key}: {run['reasons']}"
        assert run["result"]["codes"] == {"OK": run["result"]["count"]}, key
        assert run["result"]["count"] > 0
    assert code == 0
    assert (tmp_path / "latest" / "report.html").read_text().count("<svg") >= 2
