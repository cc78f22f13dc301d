"""Document storage: the contract (``base``), MongoDB (``mongo``) and the embedded default (``embedded``).

Services call ``open_store`` once at start and hand the store to their repositories.
"""

from __future__ import annotations

from pathlib import Path

from services.runtime.storage.base import (
    Collection,
    CollectionSpec,
    Document,
    DocumentStore,
    DuplicateKeyError,
    Filter,
    IndexSpec,
    Sort,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
    Update,
)
from services.runtime.storage.embedded import EmbeddedStore
from services.runtime.storage.mongo import MongoStore

__all__ = [
    "Collection",
    "CollectionSpec",
    "Document",
    "DocumentStore",
    "DuplicateKeyError",
    "EmbeddedStore",
    "Filter",
    "IndexSpec",
    "MongoStore",
    "Sort",
    "StoreError",
    "StoreTimeout",
    "StoreUnavailable",
    "Update",
    "open_store",
]


def open_store(mongo_url: str, database: str, data_dir: Path, service: str) -> DocumentStore:
    """MongoDB when ``mongo_url`` is set, else the embedded store in ``data_dir/<service>.sqlite3``."""
    if mongo_url:
        return MongoStore(mongo_url, database, app_name=f"fittracker-{service}")
    return EmbeddedStore(data_dir / f"{service}.sqlite3")
