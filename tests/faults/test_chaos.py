"""A short chaos run (``tools/chaos.py``) on the fault stack: seeded random faults under a user load.

``make chaos`` runs the same for minutes on a stack of its own; this one runs 30 s so that every
``make test`` replays a few faults of each kind and checks the same invariants.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.conftest import MATRIX, FaultStack
from tools.chaos import execute

pytestmark = [pytest.mark.edge, pytest.mark.redis, pytest.mark.timeout(240)]


def test_short_chaos_run_loses_nothing_and_applies_every_event_once(faults: FaultStack, tmp_path: Path) -> None:
    report = execute(faults.stack, faults.redis, faults.proxy, minutes=0.5, seed=7, users=4, out=tmp_path,
                     say=lambda line: None)

    MATRIX.append({"fault": f"chaos 30 s, seed 7 ({len(report['faults'])} faults)", "sent": report["calls"],
                   "failed": report["failed"], "retried": report["retried_by_edge"] + report["retried_by_client"],
                   "lost": report["data"]["lost"], "p99_ms": report["p99_ms"]})
    assert len(report["faults"]) >= 3, report["faults"]
    assert report["data"]["lost"] == 0, report["data"]["problems"]
    assert report["data"]["counted_twice"] == 0, report["data"]["problems"]
    assert report["data"]["inconsistent"] == 0, report["data"]["problems"]
    assert report["events_published"] == report["events_applied"] == report["sessions_completed"] > 0, report
    assert (tmp_path / "report.html").read_text().count("<svg") == 1
