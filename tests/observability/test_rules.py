"""The Prometheus rules and configs through the real promtool: syntax, and every alert's unit tests."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from tools.devstack import Stack
from tools.envoy_config import Address
from tools.observe import BIN, OBSERVABILITY, RULE_FILES, prometheus_config

PROMETHEUS = OBSERVABILITY / "prometheus"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.test.yml"))


def promtool(*args: str) -> str:
    done = subprocess.run([str(BIN / "promtool"), *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_rules_are_valid() -> None:
    assert "SUCCESS" in promtool("check", "rules", *map(str, RULE_FILES))


def test_every_alert_passes_its_promtool_unit_tests() -> None:
    assert RULE_TESTS
    out = promtool("test", "rules", *map(str, RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_every_alert_has_a_test_that_fires_it_and_one_that_keeps_it_quiet() -> None:
    alerts = {rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            check: dict[str, Any]
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - fires == set(), "alerts no test fires"
    assert alerts - quiet == set(), "alerts no test keeps quiet"


def test_the_kubernetes_scrape_config_is_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS / "prometheus-kubernetes.yml"))


def test_the_local_scrape_config_covers_every_replica_and_the_edge(tmp_path: Path) -> None:
    stack = Stack(tmp_path / "stack", replicas=2, use_free_ports=True, metrics=True, sink=lambda line: None)
    config = prometheus_config(stack, Address("127.0.0.1", 9093))
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    assert "SUCCESS" in promtool("check", "config", str(path))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for group in jobs["fittracker"]["static_configs"] for t in group["targets"]]
    assert sorted(targets) == sorted(str(r.metrics_address) for r in stack.replicas)
    assert jobs["fittracker-edge"]["metrics_path"] == "/stats/prometheus"
