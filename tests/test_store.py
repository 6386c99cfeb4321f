"""The registration store's contract, run against SQLite and a real PostgreSQL alike."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from dovenotify.dispatch import wants
from dovenotify.store import COLUMNS, SCHEMA, SCHEMA_VERSION, Registration, StoreError, open_store
from dovenotify.store_postgres import MIGRATIONS
from tests.harness.postgres import Postgres, postgres_server, postgres_url

__all__ = ["postgres_server", "postgres_url"]

TOKEN_A = "aa" * 32
TOKEN_B = "bb" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "registrations.sqlite")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database: str) -> Iterator:
    opened = open_store(database)
    yield opened
    opened.close()


def reg(user: str = "alice", account: str = "ACC1", token: str = TOKEN_A, **kw) -> Registration:
    return Registration(
        username=user,
        account_id=account,
        device_token=token,
        topic=kw.pop("topic", "com.apple.mail.XServer.x"),
        mailboxes=kw.pop("mailboxes", ("INBOX",)),
        **kw,
    )


def test_register_then_list(store):
    store.register(reg(registered_at=100.0))
    store.register(reg("bob", registered_at=50.0, mailboxes=("INBOX", "Notes", "Ünïcode")))
    assert store.devices("alice") == [reg(registered_at=100.0)]
    assert [d.username for d in store.devices()] == ["alice", "bob"]
    assert store.devices("bob")[0].mailboxes == ("INBOX", "Notes", "Ünïcode")
    assert store.devices("carol") == []


def test_registering_again_updates_in_place(store):
    store.register(reg(registered_at=100.0))
    store.register(reg(registered_at=200.0, topic="new.topic", mailboxes=("Notes",)))
    assert store.devices() == [reg(registered_at=200.0, topic="new.topic", mailboxes=("Notes",))]


def test_cloned_devices_are_both_kept(store):
    # Two iPhones restored from one backup: same account id, different tokens.
    store.register(reg(token=TOKEN_A, registered_at=1.0))
    store.register(reg(token=TOKEN_B, registered_at=2.0))
    assert [d.device_token for d in store.devices("alice")] == [TOKEN_A, TOKEN_B]


def test_record_push_is_kept_across_reregistration(store):
    store.register(reg(registered_at=1.0))
    store.record_push(reg().key, 5.0, "delivered")
    (device,) = store.devices()
    assert (device.last_push_at, device.last_push_result) == (5.0, "delivered")
    store.register(reg(registered_at=9.0))
    assert store.devices()[0].last_push_result == "delivered"


def test_remove_only_what_matches_every_criterion(store):
    store.register(reg(token=TOKEN_A, registered_at=10.0))
    store.register(reg(token=TOKEN_B, registered_at=30.0))
    store.register(reg("bob", token=TOKEN_A, registered_at=10.0))
    # A 410 stamped at 20 s removes the older registration, not the fresh one.
    assert store.remove(username="alice", registered_before=20.0) == [
        reg(token=TOKEN_A, registered_at=10.0)
    ]
    assert store.remove(device_token=TOKEN_B.upper()) == [reg(token=TOKEN_B, registered_at=30.0)]
    assert [d.username for d in store.devices()] == ["bob"]
    with pytest.raises(ValueError, match="every registration"):
        store.remove()


def test_registrations_survive_reopening(database):
    first = open_store(database)
    first.register(reg(registered_at=1.0))
    first.close()
    again = open_store(database)
    try:
        assert again.devices() == [reg(registered_at=1.0)]
    finally:
        again.close()


def test_concurrent_upserts_from_several_nodes(database):
    """Several nodes (one connection each) registering the same devices at once."""
    nodes = [open_store(database) for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(nodes))

    def node(store, n: int) -> None:
        start.wait()
        try:
            for i in range(50):
                store.register(reg(f"user{i % 10}", registered_at=float(n * 100 + i)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=node, args=(s, n)) for n, s in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        devices = nodes[0].devices()
        assert sorted(d.username for d in devices) == sorted(f"user{i}" for i in range(10))
    finally:
        for s in nodes:
            s.close()


def _set_newer_schema(database: str) -> Callable[[], None]:
    if database.startswith("postgresql://"):

        def newer() -> None:
            with psycopg.connect(database, autocommit=True) as db:
                db.execute("UPDATE dovenotify_schema SET version = %s", (SCHEMA_VERSION + 1,))

    else:

        def newer() -> None:
            with contextlib.closing(sqlite3.connect(database)) as db, db:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")

    return newer


def test_a_newer_schema_is_refused_not_damaged(database):
    open_store(database).close()
    _set_newer_schema(database)()
    with pytest.raises(StoreError, match="newer dovenotify"):
        open_store(database)


# What dovenotify stored before it decoded names: the client's spelling, as is.
SPELLED = ["INBOX", "Entw&APw-rfe", "&g0l6Pw-", "Q&A", "Entwürfe"]


def _write_version_1(database: str) -> None:
    """A registration as a schema 1 database holds it (dovenotify before mailbox decoding)."""
    row = ("alice", "ACC1", TOKEN_A, "com.apple.mail.XServer.x", 100.0)
    if database.startswith("postgresql://"):
        with psycopg.connect(database, autocommit=True) as db:
            db.execute(MIGRATIONS[1])
            db.execute("CREATE TABLE dovenotify_schema (version INTEGER NOT NULL)")
            db.execute("INSERT INTO dovenotify_schema VALUES (1)")
            values = ", ".join(["%s"] * 6)
            db.execute(
                f"INSERT INTO registrations ({COLUMNS}) VALUES ({values}, NULL, NULL)",
                (*row[:4], SPELLED, row[4]),
            )
    else:
        with contextlib.closing(sqlite3.connect(database)) as db, db:
            db.executescript(SCHEMA)
            db.execute("PRAGMA user_version=1")
            db.execute(
                f"INSERT INTO registrations ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL)",
                (*row[:4], json.dumps(SPELLED), row[4]),
            )


def test_registrations_stored_before_names_were_decoded_are_matched(database):
    _write_version_1(database)
    with contextlib.closing(open_store(database)) as store:
        (device,) = store.devices("alice")
    # Names that do not decode ("Q&A") were UTF-8 already; duplicates become one.
    assert device.mailboxes == ("INBOX", "Entwürfe", "草稿", "Q&A")
    assert [m for m in ("Entwürfe", "草稿", "Q&A", "Notes") if wants(device, m)] == [
        "Entwürfe",
        "草稿",
        "Q&A",
    ]
    # Opening it again changes nothing: the schema version says it is done.
    with contextlib.closing(open_store(database)) as store:
        assert store.devices("alice") == [device]


def test_postgres_nodes_starting_together_migrate_once(postgres_server: Postgres):
    """Fresh database, several nodes opening it at the same instant: one schema, no error."""
    url = postgres_server.create_database("race")
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def node() -> None:
        start.wait()
        try:
            open_store(url).close()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=node) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(url) as db:
        assert db.execute("SELECT version FROM dovenotify_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_postgres_reconnects_after_the_server_drops_the_connection(postgres_url):
    store = open_store(postgres_url)
    try:
        store.register(reg(registered_at=1.0))
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        assert store.devices() == [reg(registered_at=1.0)]
    finally:
        store.close()


def test_unreachable_postgres_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot open the registration database"):
        open_store(f"postgresql://postgres@/nothing?host={tmp_path}&connect_timeout=1")
