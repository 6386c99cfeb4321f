"""Faults on the real stack: nothing acknowledged is lost, nothing waits on a sick part.

Each test drives real Dovecot, `dovenotify serve` and an HTTP/2 mTLS APNs stand-in
(the host's Dovecot only: these faults are the service's, not Dovecot's).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import psycopg
import pytest
import trio

from dovenotify.store import open_store
from tests.harness.apns_standin import Answer, run_apns_standin
from tests.harness.dovecot import deliver, free_ports
from tests.harness.postgres import postgres_server, postgres_url
from tests.harness.service import run_service
from tests.harness.stack import Stack, run_stack
from tests.test_metrics import metric

__all__ = ["postgres_server", "postgres_url"]

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
ALICE = "a1" * 32
BOB = "b0" * 32
MAIL = b"Subject: fault\r\n\r\nhello\r\n"
# The Dovecot snippet in tests/harness/stack.py: the Lua driver's and the
# post-login helper's timeouts.
EVENT_TIMEOUT = 0.2
RELAY_TIMEOUT = 0.5

# registrations_per_user for tests that register many devices for one user.
UNBOUNDED = 100000


async def register(stack: Stack, user: str, token: str, account: str = ACCOUNT) -> str:
    """Log in as the iPhone, register, log out; the tagged status (OK, NO, BAD)."""
    phone = await stack.iphone(user)
    reply = await phone.xapplepushservice(account, token, ["INBOX"])
    await phone.logout()
    return reply.status


async def deliver_async(stack: Stack, user: str) -> float:
    return await trio.to_thread.run_sync(deliver, stack.dovecot, user, MAIL)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_kill_9_loses_no_acknowledged_registration(test_pki, backend, request):
    overrides = {"database": request.getfixturevalue("postgres_url")} if backend != "sqlite" else {}
    # Every registration is alice's: none may give way to registrations_per_user.
    overrides["registrations_per_user"] = UNBOUNDED
    async with run_stack(test_pki, overrides, version=None) as stack:
        acknowledged: list[str] = []
        delivered = 0

        async def iphones(worker: int) -> None:
            for n in range(12):
                token = f"{worker:02x}{n:062x}"
                # A session relayed by the killed service drops with it (the iPhone
                # reconnects); what counts is what was acknowledged.
                with contextlib.suppress(EOFError, trio.BrokenResourceError):
                    if await register(stack, "alice", token, f"ACC-{worker}-{n}") == "OK":
                        acknowledged.append(token)
                if len(acknowledged) == 10 and stack.service.process.returncode is None:
                    stack.service.process.kill()

        async def mail() -> None:
            nonlocal delivered
            for _ in range(20):
                await deliver_async(stack, "alice")  # asserts Dovecot accepted it
                delivered += 1

        async with trio.open_nursery() as nursery:
            for worker in range(3):
                nursery.start_soon(iphones, worker)
            nursery.start_soon(mail)
        await stack.service.process.wait()
        assert stack.service.process.returncode == -signal.SIGKILL, stack.service.log_text()
        assert delivered == 20  # mail kept flowing while dovenotify was dead
        # More mail while it is certainly dead (the Lua driver spools the events).
        await deliver_async(stack, "alice")
        before_restart = len(stack.standin.requests)

        async with run_service(stack.root / "restarted", stack.settings):
            store = open_store(stack.settings["database"])
            try:
                stored = {d.device_token for d in store.devices("alice")}
            finally:
                store.close()
            assert len(acknowledged) >= 10
            assert set(acknowledged) <= stored
            # Every device that had mail during the outage is pushed once it is back.
            expected = {f"/3/device/{token}" for token in stored}
            while not expected <= {r.path for r in stack.standin.requests[before_restart:]}:
                await stack.standin.next_request(timeout=15)
            # And it works again: a new registration, a new mail, a push.
            assert await register(stack, "bob", BOB) == "OK"
            await deliver_async(stack, "bob")
            while (await stack.standin.next_request()).path != f"/3/device/{BOB}":
                pass


@contextlib.asynccontextmanager
async def black_hole(port: int):
    """Accepts TCP connections on `port` and never says a word."""
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    held: list[trio.SocketStream] = []
    reached = trio.Event()  # set when the first connection comes in

    async def swallow() -> None:
        while True:
            held.append(await listeners[0].accept())
            reached.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(swallow)
        yield reached
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listeners[0].aclose()


def log_lines_since(text: str, start: int, level: str = "INFO|WARNING|ERROR") -> list[str]:
    return [
        line for line in text[start:].splitlines() if re.search(rf" ({level}) dovenotify", line)
    ]


async def outage_line(stack: Stack, start: int, pattern: str, timeout: float = 100) -> None:
    """Until the service has logged a line matching `pattern` since `start`.

    The sender's backoff (up to a minute, with jitter) decides when it tries
    again, so the bounds here are generous; a typical run takes a few seconds.
    """
    with trio.fail_after(timeout):
        while not any(
            re.search(pattern, line) for line in log_lines_since(stack.service.log_text(), start)
        ):
            await trio.sleep(0.05)


async def test_apns_outage_pushes_each_device_once_and_logs_it_once(test_pki):
    (port,) = free_ports(1)
    apns = {
        "certificate": str(test_pki.client.combined_pem),
        "endpoint": f"https://127.0.0.1:{port}",
        "ca_file": str(test_pki.ca_file),
        "timeout": 0.5,
    }
    async with (
        run_stack(test_pki, {"apns": apns, "log_level": "info"}, version=None) as stack,
    ):
        # Enough devices that logging per device or per event would show.
        devices = {
            f"/3/device/{user[0]}{n:063x}": user for user in ("alice", "bob") for n in range(4)
        }
        async with run_apns_standin(test_pki, port=port) as apple:
            for n, (path, user) in enumerate(devices.items()):
                assert await register(stack, user, path.rsplit("/", 1)[1], f"ACC-{n}") == "OK"
            await deliver_async(stack, "alice")
            for _ in range(4):
                await apple.next_request()
        outage_starts = len(stack.service.log_text())

        async def deliveries() -> None:
            for _ in range(5):
                await deliver_async(stack, "alice")
                await deliver_async(stack, "bob")

        # Each phase lasts until the sender has met it, and the next begins at once:
        # the sender's backoff grows with every failure, so lingering in a phase
        # only makes the next one wait longer. Mail keeps coming in each phase.
        # Refused: nothing listens on APNs's port.
        await deliver_async(stack, "alice")
        # Usually met at once; sometimes the sender is still backing off from the
        # dropped connection, and the black hole below is its first try.
        with trio.move_on_after(10):
            await outage_line(stack, outage_starts, r"WARNING.*APNs")
        await deliveries()
        # A black hole: connections are accepted, nothing ever answers.
        async with black_hole(port) as reached:
            with trio.fail_after(100):
                await reached.wait()
            await outage_line(stack, outage_starts, r"WARNING.*Timeout")
            await deliveries()
        # APNs answers again, but only 503 ServiceUnavailable.
        unavailable = Answer(503, {"reason": "ServiceUnavailable"})
        async with run_apns_standin(test_pki, port=port, responder=lambda r: unavailable) as apple:
            await apple.next_request(timeout=100)
            await outage_line(stack, outage_starts, r"WARNING.* 503")
            await deliveries()
            # Recovery. Each device waited out a backoff; within it comes one push each.
            recovered_at = len(apple.requests)
            apple.responder = lambda r: Answer(200)
            while {r.path for r in apple.requests[recovered_at:]} != set(devices):
                await apple.next_request(timeout=100)
            # Nothing more is due: a second push per device would come at once.
            await trio.sleep(1)
            after = [r.path for r in apple.requests[recovered_at:]]
            assert sorted(after) == sorted(devices), after
            await outage_line(stack, outage_starts, r"INFO.*again")
            outage_log = log_lines_since(stack.service.log_text(), outage_starts)

    # 31 deliveries to 8 devices during the outage: the log tells about the outage
    # (a line per kind of failure, and one when it ends), not about every event or
    # device.
    assert len(outage_log) <= 6, "\n".join(outage_log)
    # ... and the silence and the 503 were each met, then the end.
    for sign in (r"WARNING.*Timeout", r"WARNING.* 503", r"INFO.*again"):
        assert any(re.search(sign, line) for line in outage_log), (sign, outage_log)


def send_events(path: str, users: list[str], count: int, at_once: int = 100) -> None:
    """`count` new-mail events, one connection each as the Lua driver sends them,
    `at_once` connections at a time, as from as many deliveries in parallel."""
    for first in range(0, count, at_once):
        with contextlib.ExitStack() as connections:
            for n in range(first, min(first + at_once, count)):
                s = connections.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                s.connect(path)
                s.sendall(f"MessageNew\t{users[n % len(users)]}\tINBOX\tlmtp\n".encode())


@attrs.frozen
class Sample:
    pending: float
    resident_kib: int
    threads: int


def sample(pid: int, metrics_text: str) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    return Sample(
        pending=metric(metrics_text, "dovenotify_pending_pushes"),
        resident_kib=int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)),
        threads=int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1)),
    )


async def scrape_when(http: httpx.AsyncClient, name: str, value: float) -> str:
    """/metrics once `name` has reached `value`."""
    with trio.fail_after(30):
        while metric(text := (await http.get("/metrics")).text, name) < value:
            await trio.sleep(0.02)
    return text


# What 9,000 more events may add to the service's memory during an outage: a few
# hundred KiB was measured. Keeping as little as a registration per event would
# add several MiB.
RSS_GROWTH_KIB = 2048
# A worker thread for store lookups (at most 40) costs some 100 KiB; if the pool
# grows between the samples under load, that is not per-event state.
THREAD_KIB = 256


async def test_apns_outage_holds_one_push_per_device_however_many_events(test_pki):
    (port,) = free_ports(1)
    unavailable = Answer(503, {"reason": "ServiceUnavailable"})
    settings = {"metrics_listen": f"127.0.0.1:{port}", "log_level": "info"}
    async with (
        run_stack(test_pki, settings, version=None, responder=lambda r: unavailable) as stack,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http,
    ):
        users = ["alice", "bob"]
        devices = [f"{user[0]}{n:063x}" for user in users for n in range(4)]
        for n, token in enumerate(devices):
            assert await register(stack, users[n // 4], token, f"ACC-{n}") == "OK"
        path, pid = stack.settings["event_socket"], stack.service.process.pid
        sent = 0

        async def sample_after(total: int, at_once: int = 100) -> Sample:
            nonlocal sent
            # In steps the service keeps up with, so what is measured is what it
            # keeps, not a backlog of connections it has yet to read.
            while sent < total:
                await trio.to_thread.run_sync(send_events, path, users, 500, at_once)
                sent += 500
                text = await scrape_when(http, "dovenotify_events_received_total", sent)
            return sample(pid, text)

        # The first thousand come all at once: that brings the service's worker
        # threads for store lookups (at most 40, some 100 KiB each) to their
        # number, which is not what is measured.
        early = await sample_after(1_000, at_once=500)
        late = await sample_after(10_000)
        assert stack.standin.requests, "APNs was never asked"
    # One push waits per device, not per event...
    assert early.pending == late.pending == len(devices)
    # ... and nothing else piles up either.
    allowed = RSS_GROWTH_KIB + max(0, late.threads - early.threads) * THREAD_KIB
    assert late.resident_kib - early.resident_kib < allowed, (early, late)


async def test_hung_service_holds_up_no_delivery_and_no_login(test_pki):
    async with run_stack(test_pki, version=None) as stack:
        assert await register(stack, "alice", ALICE) == "OK"
        stack.service.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(5):
                assert await deliver_async(stack, "alice") < EVENT_TIMEOUT + 0.5
            start = time.monotonic()
            phone = await stack.iphone("bob")
            logged_in = time.monotonic() - start
            assert (await phone.command("NOOP")).ok
            await phone.logout()
            assert logged_in < RELAY_TIMEOUT + 1.0
        finally:
            stack.service.process.send_signal(signal.SIGCONT)
        # Back from the hang: the mail that came meanwhile is pushed, and logins
        # go through the relay again.
        assert (await stack.standin.next_request()).path == f"/3/device/{ALICE}"
        assert await register(stack, "bob", BOB) == "OK"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here to fill up: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(directory: Path) -> Path:
    """Write until the file system is full; return the file to delete to undo it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


@contextlib.contextmanager
def locked(database: str) -> Iterator[None]:
    """Another writer holding the database (an admin's sqlite3 shell, a backup)."""
    db = sqlite3.connect(database, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        db.execute("ROLLBACK")
        db.close()


@contextlib.contextmanager
def postgres_locked(url: str) -> Iterator[None]:
    """A session holding the table (a migration, VACUUM FULL, an admin's LOCK)."""
    with psycopg.connect(url) as db:
        db.execute("LOCK TABLE registrations IN ACCESS EXCLUSIVE MODE")
        yield
        db.rollback()


@pytest.mark.parametrize("fault", ["database locked", "disk full", "postgresql locked"])
async def test_a_registration_that_cannot_be_stored_gets_no(test_pki, tmp_path, fault, request):
    with contextlib.ExitStack() as cleanup:
        overrides = {}
        if fault == "disk full":
            disk = cleanup.enter_context(small_filesystem(tmp_path / "disk"))
            overrides["database"] = str(disk / "registrations.sqlite")
        elif fault == "postgresql locked":
            overrides["database"] = request.getfixturevalue("postgres_url")
        async with run_stack(test_pki, overrides, version=None) as stack:
            database = stack.settings["database"]
            assert await register(stack, "alice", ALICE) == "OK"
            with contextlib.ExitStack() as fault_on:
                if fault == "disk full":
                    fault_on.callback(os.unlink, fill(disk))
                elif fault == "postgresql locked":
                    fault_on.enter_context(postgres_locked(database))
                else:
                    fault_on.enter_context(locked(database))
                # The iPhone is told NO (it retries later), not OK for a lost registration,
                # and not left waiting.
                with trio.fail_after(20):
                    assert await register(stack, "bob", BOB) == "NO"
                # The session and the service go on.
                phone = await stack.iphone("bob")
                assert (await phone.command("NOOP")).ok
                await phone.logout()
            assert stack.service.process.returncode is None
            assert await register(stack, "bob", BOB) == "OK"
            if fault != "postgresql locked":
                with contextlib.closing(sqlite3.connect(database)) as db:
                    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            store = open_store(database)
            try:
                assert {d.device_token for d in store.devices()} == {ALICE, BOB}
            finally:
                store.close()
            await deliver_async(stack, "bob")
            assert (await stack.standin.next_request()).path == f"/3/device/{BOB}"


@contextlib.contextmanager
def registrations_in(url: str, directory: Path) -> Iterator[None]:
    """The registrations table and its indexes in a tablespace in `directory` (a
    disk of its own), as a site with a separate volume for its database has them."""
    postgres = pwd.getpwnam("postgres")
    os.chown(directory, postgres.pw_uid, postgres.pw_gid)
    with psycopg.connect(url, autocommit=True) as db:
        indexes = [
            row[0]
            for row in db.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'registrations'"
            )
        ]

        def move_to(tablespace: str) -> None:
            db.execute(f"ALTER TABLE registrations SET TABLESPACE {tablespace}")
            for index in indexes:
                db.execute(f'ALTER INDEX "{index}" SET TABLESPACE {tablespace}')

        db.execute(f"CREATE TABLESPACE small_disk LOCATION '{directory}'")
        try:
            move_to("small_disk")
            yield
        finally:
            move_to("pg_default")
            db.execute("DROP TABLESPACE small_disk")


def postgres_problems(url: str) -> list[str]:
    """What amcheck finds wrong in the registrations table and its indexes."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        problems = [str(row) for row in db.execute("SELECT * FROM verify_heapam('registrations')")]
        for (index,) in db.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'registrations'"
        ).fetchall():
            # Raises on a damaged index.
            db.execute("SELECT bt_index_check(%s::regclass, true)", (index,))
        return problems


async def test_postgresql_disk_full_answers_no_and_keeps_what_it_acknowledged(
    test_pki, postgres_server, postgres_url
):
    # Where the postgres user can reach it (not under root's pytest directory).
    with small_filesystem(postgres_server.root / "small-disk") as disk:
        settings = {"database": postgres_url, "registrations_per_user": UNBOUNDED}
        async with run_stack(test_pki, settings, version=None) as stack:
            assert await register(stack, "alice", ALICE) == "OK"
            with registrations_in(postgres_url, disk):
                filler = fill(disk)
                try:
                    # PostgreSQL writes a row into room left in the table's last page
                    # (and its WAL, on another disk): those registrations are stored.
                    # The one that needs a new page meets the full disk.
                    phone = await stack.iphone("bob")
                    acknowledged = []
                    for n in range(500):
                        token = f"{n:064x}"
                        reply = await phone.xapplepushservice(f"ACC-{n}", token, ["INBOX"])
                        if not reply.ok:
                            break
                        acknowledged.append(token)
                    # The iPhone is told NO (it retries later), and the session goes on.
                    assert reply.status == "NO", reply
                    assert (await phone.command("NOOP")).ok
                    await phone.logout()
                    assert "No space left on device" in stack.service.log_text()
                finally:
                    os.unlink(filler)
                assert stack.service.process.returncode is None
                # Space again: the iPhone's retry goes through.
                phone = await stack.iphone("bob")
                assert (await phone.xapplepushservice(f"ACC-{n}", token, ["INBOX"])).ok
                await phone.logout()
                store = open_store(postgres_url)
                try:
                    stored = {d.device_token for d in store.devices()}
                finally:
                    store.close()
                assert stored == {ALICE, token, *acknowledged}
                assert postgres_problems(postgres_url) == []
                await deliver_async(stack, "alice")
                assert (await stack.standin.next_request()).path == f"/3/device/{ALICE}"
