"""The registrations in SQLite, the default store.

SQLite in WAL mode with synchronous=FULL, so a registration is on disk
before the relay answers OK.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from dovenotify.core.mailboxes import upgrade
from dovenotify.store.base import (
    COLUMNS,
    SCHEMA_VERSION,
    Registration,
    StoreError,
    criteria,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS registrations (
    username TEXT NOT NULL,
    account_id TEXT NOT NULL,
    device_token TEXT NOT NULL,
    topic TEXT NOT NULL,
    mailboxes TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_push_at REAL,
    last_push_result TEXT,
    PRIMARY KEY (username, account_id, device_token)
);
CREATE INDEX IF NOT EXISTS registrations_by_token ON registrations (device_token);
"""


def _keep_private(path: Path) -> None:
    """Registrations (names, tokens, folders) are nobody else's business: a database
    an older dovenotify left readable (0644) is made owner-only, journal included."""
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            st = file.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                file.chmod(st.st_mode & 0o700)


class SQLiteStore:
    """Thread-safe: the service calls it from worker threads, one call at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate()
            _keep_private(path)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{path}: cannot open the registration database: {e}") from e
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: the database was written by a newer dovenotify"
                f" (schema {version}, this one knows {SCHEMA_VERSION})"
            )
        self._db.executescript(SCHEMA)
        # Another process may be migrating the same file: decide inside the lock.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if 0 < version < 2:
                self._decode_mailboxes()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _decode_mailboxes(self) -> None:
        rows = self._db.execute("SELECT rowid, mailboxes FROM registrations").fetchall()
        for rowid, stored in rows:
            names = json.loads(stored)
            if (decoded := upgrade(names)) != names:
                self._db.execute(
                    "UPDATE registrations SET mailboxes = ? WHERE rowid = ?",
                    (json.dumps(decoded), rowid),
                )

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """One call at a time; a database that fails it (locked, disk full) is a StoreError."""
        with self._lock:
            try:
                yield
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e

    def register(self, reg: Registration) -> None:
        with self._using():
            self._db.execute(
                f"INSERT INTO registrations ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)"
                " ON CONFLICT (username, account_id, device_token) DO UPDATE SET"
                " topic = excluded.topic, mailboxes = excluded.mailboxes,"
                " registered_at = excluded.registered_at",
                (
                    reg.username,
                    reg.account_id,
                    reg.device_token,
                    reg.topic,
                    json.dumps(list(reg.mailboxes)),
                    reg.registered_at,
                ),
            )

    def devices(self, username: str | None = None) -> list[Registration]:
        query = f"SELECT {COLUMNS} FROM registrations"
        args: tuple[str, ...] = ()
        if username is not None:
            query += " WHERE username = ?"
            args = (username,)
        with self._using():
            rows = self._db.execute(query + " ORDER BY username, registered_at", args).fetchall()
        return [_registration(row) for row in rows]

    def record_push(self, key: tuple[str, str, str], at: float, result: str) -> None:
        with self._using():
            self._db.execute(
                "UPDATE registrations SET last_push_at = ?, last_push_result = ?"
                " WHERE username = ? AND account_id = ? AND device_token = ?",
                (at, result, *key),
            )

    def remove(
        self,
        *,
        username: str | None = None,
        account_id: str | None = None,
        device_token: str | None = None,
        registered_before: float | None = None,
    ) -> list[Registration]:
        """Delete the registrations matching every given criterion; return them."""
        where, args = criteria(username, account_id, device_token, registered_before)
        with self._using(), self._db:
            rows = self._db.execute(
                f"SELECT {COLUMNS} FROM registrations WHERE {where}", args
            ).fetchall()
            self._db.execute(f"DELETE FROM registrations WHERE {where}", args)
        return [_registration(row) for row in rows]


def _registration(row: Iterable[object]) -> Registration:
    username, account_id, token, topic, mailboxes, registered, pushed, result = row
    return Registration(
        username=str(username),
        account_id=str(account_id),
        device_token=str(token),
        topic=str(topic),
        mailboxes=tuple(json.loads(str(mailboxes))),
        registered_at=float(registered),  # type: ignore[arg-type]
        last_push_at=float(pushed) if pushed is not None else None,  # type: ignore[arg-type]
        last_push_result=str(result) if result is not None else None,
    )
