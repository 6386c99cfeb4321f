"""Which store the `database` setting names: a SQLite file path, or a postgresql:// URL."""

from __future__ import annotations

from pathlib import Path

from dovenotify.store.base import Store
from dovenotify.store.sqlite import SQLiteStore


def open_store(database: str) -> Store:
    """The store for `database`: a SQLite file path, or a postgresql:// URL."""
    if database.startswith(("postgresql://", "postgres://")):
        # Imported here so that SQLite-only sites need no PostgreSQL driver loaded.
        from dovenotify.store.postgres import PostgresStore

        return PostgresStore(database)
    return SQLiteStore(Path(database))
