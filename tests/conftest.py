"""Session-wide fixtures: real Redis and MongoDB-protocol (FerretDB) servers, started on first use.

Sub-directory conftests (tests/<service>/conftest.py) build their own fixtures on these.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from services.runtime.storage.embedded import REFUSE_SCANS_ENV
from tests.servers import start_ferretdb, start_redis
from tests.support import BACKENDS

# Every embedded store the tests open, in this process and in the service processes they start,
# refuses a query that no index answers: a query added without its index fails the test that runs it.
os.environ[REFUSE_SCANS_ENV] = "1"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a Redis server private to this test session (database 0)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mongo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a MongoDB wire-protocol server (FerretDB on SQLite) private to this test session."""
    server = start_ferretdb(tmp_path_factory.mktemp("ferretdb"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which storage and event bus a service under test runs on (see tests.support.BACKENDS)."""
    return str(request.param)
