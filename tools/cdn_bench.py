"""The CDN tier's worth: cached reads through Varnish against the same reads straight from the edge.

Starts the user and workout services (one replica each, embedded store, the edge's quotas lifted),
the edge, and Debian's Varnish in front of it with tools/cdn_vcl.py's rules; registers one member;
then loads the same catalog page and the JWKS with h2load (HTTP/1.1, the same connections and
requests in flight) first at the edge, then through Varnish, and reports both rates and their ratio.

    python tools/cdn_bench.py [--seconds 10]     (make bench-cdn)

Writes ``ghz-loadtests/reports/latest-cdn/cdn.json``. Loopback only; every run is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import start_varnish  # the same Varnish start-up as tests/edge/test_cdn.py
from tools import cdn_vcl
from tools.bench_common import run_h2load, write_json
from tools.devstack import Stack

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "ghz-loadtests" / "reports" / "latest-cdn" / "cdn.json"
#: Connections and requests in flight on each, for both targets.
CLIENTS = 8
STREAMS = 1
READS = {"catalog page": "/v1/exercises?page_size=20", "JWKS": "/v1/auth/jwks"}
SERVICE_ENV = {"FITTRACKER_ENVIRONMENT": "test", "FITTRACKER_LOG_LEVEL": "WARNING",
               "FITTRACKER_ARGON2_MEMORY_KIB": "1024", "FITTRACKER_ARGON2_TIME_COST": "1"}


def quiet(_line: str) -> None:
    """Drop the stack's log lines (an access line per request would drown the figures)."""


def register(base: str) -> str:
    """Register a member through the edge; their access token."""
    body = json.dumps({"email": "cdn-bench@example.com", "password": "cdn-bench-password-42",
                       "display_name": "Bench"}).encode()
    request = urllib.request.Request(f"{base}/v1/users:register", data=body,  # noqa: S310 (loopback, built here)
                                     headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310 (loopback, built here)
        token: str = json.load(reply)["tokens"]["access_token"]
    return token


def measure(seconds: float) -> dict[str, Any]:
    """Start everything, load both targets, stop everything; the figures."""
    with tempfile.TemporaryDirectory(prefix="cdn-bench-") as scratch:
        stack = Stack(Path(scratch) / "stack", services=["user", "workout"], replicas=1, use_free_ports=True,
                      service_env=SERVICE_ENV, ip_limit=None, user_limit=None, sink=quiet)
        print("==> starting user, workout and the edge", flush=True)
        stack.start(timeout=90)
        varnish = None
        try:
            edge = f"http://{stack.host}:{stack.edge_port}"
            token = register(edge)
            varnish = start_varnish(Path(scratch) / "varnish", cdn_vcl.render(stack.host, stack.edge_port))
            cdn = f"http://127.0.0.1:{varnish.port}"
            figures: dict[str, Any] = {}
            for label, path in READS.items():
                rates = {}
                for target, base in (("edge", edge), ("cdn", cdn)):
                    print(f"==> {label}: h2load for {seconds:.0f} s at the {target}", flush=True)
                    result = run_h2load(f"{base}{path}", headers={"authorization": f"Bearer {token}"},
                                        seconds=seconds, clients=CLIENTS, streams=STREAMS, extra=["--h1"])
                    if set(result.codes) != {"OK"}:
                        raise RuntimeError(f"{label} at the {target}: not every reply was a 200: {result.codes}")
                    rates[target] = round(result.rps)
                    print(f"    {result.rps:,.0f} req/s, mean {result.mean_ms} ms", flush=True)
                figures[label] = {"edge_rps": rates["edge"], "cdn_rps": rates["cdn"],
                                  "ratio": round(rates["cdn"] / rates["edge"], 1)}
            return {"clients": CLIENTS, "seconds": seconds, "protocol": "HTTP/1.1", "reads": figures}
        finally:
            if varnish is not None:
                varnish.stop()
            stack.stop()


def main() -> None:
    """Measure and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per read and target")
    args = parser.parse_args()
    report = measure(args.seconds)
    write_json(REPORT, report)
    for label, figure in report["reads"].items():
        print(f"  {label:<14} edge {figure['edge_rps']:>7,} req/s   cdn {figure['cdn_rps']:>7,} req/s   "
              f"cached/uncached {figure['ratio']}x")
    print(f"==> report: {REPORT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
