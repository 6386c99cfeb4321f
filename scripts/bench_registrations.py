"""Benchmark 5: 1,000,000 registrations in SQLite and in PostgreSQL.

The schema is dovenotify's own (made by `open_store`); the rows are bulk-loaded
(500,000 users with two devices each), because a million one-by-one durable
registrations would measure only the disk. Then, on each backend:
- the lookup dovenotify does per event (`store.devices(user)`), p50 and p99;
- one registration (durable upsert) at that size, p50 and p99;
- `dovenotify devices --user` as an admin runs it (a whole process), median.

    python -m scripts.bench_registrations [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from dovenotify.store.backends import open_store
from dovenotify.store.base import Registration
from scripts.bench_table import percentile, print_table
from tests.harness.postgres import running_postgres
from tests.harness.service import dovenotify_command, write_config

LOOKUPS = 5000
REGISTRATIONS = 500
CLI_RUNS = 5
TOPIC = "com.apple.mail.XServer.d19011df-561b-444d-ac59-09459e74a5e6"


def rows(count: int) -> Iterator[tuple[object, ...]]:
    now = time.time()
    for i in range(count):
        user = f"user{i // 2}@example.org"
        yield (user, f"ACCOUNT-{i % 2}", f"{i:064x}", TOPIC, '["INBOX"]', now - i)


def load_sqlite(path: str, count: int) -> None:
    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO registrations (username, account_id, device_token, topic, mailboxes,"
            " registered_at) VALUES (?, ?, ?, ?, ?, ?)",
            rows(count),
        )


def load_postgres(url: str, count: int) -> None:
    with psycopg.connect(url) as db, db.cursor() as cursor:
        with cursor.copy(
            "COPY registrations (username, account_id, device_token, topic, mailboxes,"
            " registered_at) FROM STDIN"
        ) as copy:
            for user, account, token, topic, mailboxes, at in rows(count):
                copy.write_row((user, account, token, topic, json.loads(mailboxes), at))
        cursor.execute("ANALYZE registrations")


def timed(action: Callable[[], object], times: int) -> list[float]:
    result = []
    for _ in range(times):
        start = time.perf_counter()
        action()
        result.append((time.perf_counter() - start) * 1000)
    return sorted(result)


def measure(name: str, database: str, count: int, load: Callable[[str, int], None], tmp: Path):
    open_store(database).close()
    start = time.perf_counter()
    load(database.removeprefix("sqlite:"), count)
    loaded = time.perf_counter() - start
    store = open_store(database)
    users = [f"user{random.randrange(count // 2)}@example.org" for _ in range(LOOKUPS)]
    found = iter(users)
    try:
        assert len(store.devices(users[0])) == 2
        lookups = timed(lambda: store.devices(next(found)), LOOKUPS)
        fresh = iter(range(REGISTRATIONS))
        registers = timed(
            lambda: store.register(
                Registration(f"new{next(fresh)}@example.org", "A", "ff" * 32, TOPIC, ("INBOX",))
            ),
            REGISTRATIONS,
        )
    finally:
        store.close()
    config = write_config(tmp / f"{name}.yaml", {"database": database})
    command = [*dovenotify_command(), "devices", "--config", str(config), "--user", users[1]]
    cli = timed(lambda: subprocess.run(command, check=True, capture_output=True), CLI_RUNS)
    return loaded, lookups, registers, cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-reg-") as tmp:
        tmp_path = Path(tmp)
        results["SQLite"] = measure(
            "sqlite", str(tmp_path / "r.sqlite"), args.rows, load_sqlite, tmp_path
        )
        with running_postgres() as pg:
            results["PostgreSQL"] = measure(
                "postgres", pg.create_database("bench"), args.rows, load_postgres, tmp_path
            )
    table = []
    for name, (loaded, lookups, registers, cli) in results.items():
        table += [
            (f"{name}: bulk load", f"{loaded:.1f} s", f"{args.rows:,} rows"),
            (f"{name}: lookup per event p50", f"{percentile(lookups, 50):.3f} ms", ""),
            (f"{name}: lookup per event p99", f"{percentile(lookups, 99):.3f} ms", ""),
            (f"{name}: register (durable) p50", f"{percentile(registers, 50):.3f} ms", ""),
            (f"{name}: register (durable) p99", f"{percentile(registers, 99):.3f} ms", ""),
            (f"{name}: dovenotify devices --user", f"{statistics.median(cli):.0f} ms", "median"),
        ]
    sqlite_p50 = percentile(results["SQLite"][1], 50)
    postgres_p50 = percentile(results["PostgreSQL"][1], 50)
    table.append(("lookup p50 ratio PostgreSQL / SQLite", f"{postgres_p50 / sqlite_p50:.1f}", ""))
    # What any `dovenotify` command costs before it touches a database.
    start_up = timed(
        lambda: subprocess.run([*dovenotify_command(), "--help"], check=True, capture_output=True),
        CLI_RUNS,
    )
    table.append(("dovenotify --help (process start)", f"{statistics.median(start_up):.0f} ms", ""))
    print_table(f"Registrations at scale: {args.rows:,} registrations", table)


if __name__ == "__main__":
    main()
