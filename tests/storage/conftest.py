"""Fixtures for the storage contract: each store under test, empty and private to the test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.runtime.storage import DocumentStore, EmbeddedStore, MongoStore

STORE_KINDS = ["embedded", pytest.param("mongo", marks=pytest.mark.mongo)]


@pytest_asyncio.fixture(params=STORE_KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DocumentStore]:
    """An empty store of each kind: a new SQLite file, or a new database on the FerretDB server."""
    if request.param == "embedded":
        # The contract checks semantics on any filter, indexed or not (index use: test_index_use.py).
        embedded = EmbeddedStore(tmp_path / "store.sqlite3", refuse_scans=False)
        yield embedded
        await embedded.close()
        return
    mongo_url: str = request.getfixturevalue("mongo_url")
    database = f"contract_{uuid.uuid4().hex[:12]}"
    mongo = MongoStore(mongo_url, database)
    yield mongo
    await mongo.raw("unused").database.client.drop_database(database)
    await mongo.close()
