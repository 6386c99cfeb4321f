"""Registrations in PostgreSQL, so several Dovecot backends share one registration set.

Same methods and meaning as `store.SQLiteStore`. Each dovenotify node keeps one
connection in autocommit mode: every statement is its own transaction, committed
(and so visible to the other nodes) before the call returns, and the upsert is a
single `INSERT ... ON CONFLICT DO UPDATE`, which PostgreSQL makes safe when
several nodes register the same device at once.

The schema is created and migrated by dovenotify itself (at start and by
`dovenotify db migrate`) under an advisory lock, so nodes starting together do
not race on `CREATE TABLE`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import psycopg

from dovenotify.core.mailboxes import upgrade
from dovenotify.store.base import COLUMNS, SCHEMA_VERSION, Registration, StoreError, criteria

T = TypeVar("T")

# Seconds one statement may wait (for a lock, mostly), as SQLiteStore's busy timeout.
STATEMENT_TIMEOUT = 5.0
# Any constant will do: it only has to be the same on every node.
_MIGRATION_LOCK = 0x646F76656E6F74  # "dovenot"


def _decode_mailboxes(db: psycopg.Connection[Any]) -> None:
    rows = db.execute(
        "SELECT username, account_id, device_token, mailboxes FROM registrations"
    ).fetchall()
    for username, account_id, device_token, names in rows:
        if (decoded := upgrade(names)) != names:
            db.execute(
                "UPDATE registrations SET mailboxes = %s"
                " WHERE username = %s AND account_id = %s AND device_token = %s",
                (decoded, username, account_id, device_token),
            )


# Version n's statements (or function) turn a version n-1 database into version n.
MIGRATIONS: dict[int, str | Callable[[psycopg.Connection[Any]], None]] = {
    1: """
    CREATE TABLE registrations (
        username TEXT NOT NULL,
        account_id TEXT NOT NULL,
        device_token TEXT NOT NULL,
        topic TEXT NOT NULL,
        mailboxes TEXT[] NOT NULL,
        registered_at DOUBLE PRECISION NOT NULL,
        last_push_at DOUBLE PRECISION,
        last_push_result TEXT,
        PRIMARY KEY (username, account_id, device_token)
    );
    CREATE INDEX registrations_by_token ON registrations (device_token);
    """,
    # Mailbox names stored in UTF-8, as Dovecot's events name them.
    2: _decode_mailboxes,
}


def _redacted(url: str) -> str:
    """The URL for messages, without its password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "the configured PostgreSQL database"
    where = info.get("host") or "localhost"
    return f"PostgreSQL database {info.get('dbname') or info.get('user') or ''!s} on {where}"


class PostgresStore:
    """Thread-safe: the service calls it from worker threads, one call at a time."""

    def __init__(self, url: str, *, connect_timeout: float = 10) -> None:
        self.url = url
        self.where = _redacted(url)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._db: psycopg.Connection[Any] | None = None
        try:
            self._connect()
            self._migrate()
        except psycopg.Error as e:
            self.close()
            raise StoreError(f"{self.where}: cannot open the registration database: {e}") from e
        except BaseException:
            # A schema this version does not know: refused, and the connection closed.
            self.close()
            raise

    def _connect(self) -> psycopg.Connection[Any]:
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
            self._db = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, int(self._connect_timeout))
            )
            # PostgreSQL waits for a lock forever by default: a table locked by an
            # admin's session would hang every registration and event lookup. Like
            # SQLite's busy timeout, give up after a while; the iPhone gets NO.
            self._db.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT * 1000)}")
        return self._db

    def _migrate(self) -> None:
        db = self._connect()
        with db.transaction():
            # A migration of a big table may take longer than one call should.
            db.execute("SET LOCAL statement_timeout = 0")
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS dovenotify_schema (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM dovenotify_schema").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.where}: the database was written by a newer dovenotify"
                    f" (schema {version}, this one knows {SCHEMA_VERSION})"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                migration = MIGRATIONS[step]
                if isinstance(migration, str):
                    db.execute(migration)
                else:
                    migration(db)
            if row is None:
                db.execute("INSERT INTO dovenotify_schema VALUES (%s)", (SCHEMA_VERSION,))
            else:
                db.execute("UPDATE dovenotify_schema SET version = %s", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        row = self._run(lambda db: db.execute("SELECT version FROM dovenotify_schema").fetchone())
        return int(row[0]) if row else 0

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """Run `work` on the connection, reconnecting once if the server dropped it.

        A connection found dead (PostgreSQL restarted, failover) is replaced and the
        statement retried: every statement here is idempotent.
        """
        with self._lock:
            try:
                return work(self._connect())
            except psycopg.OperationalError as e:
                if self._db is None or not self._db.broken:
                    raise StoreError(f"{self.where}: {e}") from e
            except psycopg.Error as e:
                raise StoreError(f"{self.where}: {e}") from e
            try:
                return work(self._connect())
            except psycopg.Error as e:
                raise StoreError(f"{self.where}: {e}") from e

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    def register(self, reg: Registration) -> None:
        self._run(
            lambda db: db.execute(
                f"INSERT INTO registrations ({COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, %s, NULL, NULL)"
                " ON CONFLICT (username, account_id, device_token) DO UPDATE SET"
                " topic = excluded.topic, mailboxes = excluded.mailboxes,"
                " registered_at = excluded.registered_at",
                (
                    reg.username,
                    reg.account_id,
                    reg.device_token,
                    reg.topic,
                    list(reg.mailboxes),
                    reg.registered_at,
                ),
            )
        )

    def devices(self, username: str | None = None) -> list[Registration]:
        query = f"SELECT {COLUMNS} FROM registrations"
        args: tuple[str, ...] = ()
        if username is not None:
            query += " WHERE username = %s"
            args = (username,)
        query += " ORDER BY username, registered_at"
        rows = self._run(lambda db: db.execute(query, args).fetchall())
        return [_registration(row) for row in rows]

    def record_push(self, key: tuple[str, str, str], at: float, result: str) -> None:
        self._run(
            lambda db: db.execute(
                "UPDATE registrations SET last_push_at = %s, last_push_result = %s"
                " WHERE username = %s AND account_id = %s AND device_token = %s",
                (at, result, *key),
            )
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
        where = where.replace("?", "%s")
        rows = self._run(
            lambda db: db.execute(
                f"DELETE FROM registrations WHERE {where} RETURNING {COLUMNS}", args
            ).fetchall()
        )
        return [_registration(row) for row in rows]


def _registration(row: Iterable[Any]) -> Registration:
    username, account_id, token, topic, mailboxes, registered, pushed, result = row
    return Registration(
        username=username,
        account_id=account_id,
        device_token=token,
        topic=topic,
        mailboxes=tuple(mailboxes),
        registered_at=float(registered),
        last_push_at=float(pushed) if pushed is not None else None,
        last_push_result=result,
    )
