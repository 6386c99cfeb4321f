"""`dovenotify devices`: removing registrations, last push shown, and registrations expiring."""

import subprocess
import time
from pathlib import Path

import trio

from dovenotify.store.base import Registration
from dovenotify.store.expiry import sweep_expired
from dovenotify.store.sqlite import SQLiteStore
from tests.harness.dovecot import deliver
from tests.harness.service import dovenotify_command
from tests.harness.stack import run_stack

DAY = 86400.0
ALICE_1 = Registration("alice", "ACC-1", "a1" * 32, "topic", ("INBOX",))
ALICE_CLONE = Registration("alice", "ACC-1", "c1" * 32, "topic", ("INBOX", "Notes"))
ALICE_2 = Registration("alice", "ACC-2", "a2" * 32, "topic", ("INBOX",))
BOB = Registration("bob", "ACC-3", "b0" * 32, "topic", ("INBOX",))


def setup(tmp_path: Path, *registrations: Registration) -> tuple[Path, Path]:
    database = tmp_path / "registrations.sqlite"
    store = SQLiteStore(database)
    for r in registrations:
        store.register(r)
    store.close()
    config = tmp_path / "dovenotify.yaml"
    config.write_text(f"database: {database}\n")
    return config, database


def devices(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*dovenotify_command(), "devices", *args], capture_output=True, text=True)


def tokens(database: Path) -> set[str]:
    store = SQLiteStore(database)
    try:
        return {r.device_token for r in store.devices()}
    finally:
        store.close()


def test_remove_by_token_account_or_user_prints_what_went(tmp_path):
    config, database = setup(tmp_path, ALICE_1, ALICE_CLONE, ALICE_2, BOB)

    result = devices("remove", "--config", str(config), "--token", ALICE_1.device_token.upper())
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Removed alice account ACC-1 device a1a1a1a1… (INBOX)\n"
    assert tokens(database) == {"c1" * 32, "a2" * 32, "b0" * 32}

    result = devices("remove", "--config", str(config), "--account-id", "ACC-1")
    assert result.stdout == "Removed alice account ACC-1 device c1c1c1c1… (INBOX, Notes)\n"

    # Any spelling of the name, as for the listing (username_format lowercase).
    result = devices("remove", "--config", str(config), "--user", "Alice")
    assert result.stdout == "Removed alice account ACC-2 device a2a2a2a2… (INBOX)\n"
    assert tokens(database) == {"b0" * 32}

    nothing = devices("remove", "--config", str(config), "--user", "alice")
    assert (nothing.returncode, nothing.stdout) == (
        1,
        "No registration matches; nothing was removed.\n",
    )


def test_remove_without_criteria_removes_nothing(tmp_path):
    config, database = setup(tmp_path, ALICE_1, BOB)
    result = devices("remove", "--config", str(config))
    assert result.returncode == 2
    assert "say which registrations to remove" in result.stderr
    assert tokens(database) == {ALICE_1.device_token, BOB.device_token}


def test_listing_shows_when_and_how_each_device_was_last_pushed(tmp_path):
    config, database = setup(tmp_path, ALICE_1, BOB)
    store = SQLiteStore(database)
    store.record_push(ALICE_1.key, 1_800_000_000, "dropped (410 Unregistered)")
    store.close()
    rows = {line.split()[0]: line for line in devices("--config", str(config)).stdout.splitlines()}
    assert rows["alice"].endswith("2027-01-15T08:00:00+00:00 dropped (410 Unregistered)")
    assert rows["bob"].endswith("never")


async def test_sweep_deletes_registrations_not_renewed_within_the_ttl(tmp_path):
    now = time.time()
    old = Registration("alice", "ACC-1", "01" * 32, "topic", ("INBOX",), now - 31 * DAY)
    fresh = Registration("alice", "ACC-1", "02" * 32, "topic", ("INBOX",), now - 29 * DAY)
    _, database = setup(tmp_path, old, fresh)
    store = SQLiteStore(database)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sweep_expired, store, 30 * DAY)
            # The first sweep runs at once; the next one is an hour away.
            while len(store.devices()) != 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert [r.device_token for r in store.devices()] == [fresh.device_token]
    finally:
        store.close()


async def test_expired_registrations_get_no_push(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        store = SQLiteStore(Path(stack.settings["database"]))
        # Written after the service's first sweep, as if it had aged since.
        stale = Registration(
            "alice", "ACC-1", "0e" * 32, "topic", ("INBOX",), time.time() - 31 * DAY
        )
        store.register(stale)
        phone = await stack.iphone()
        assert (await phone.xapplepushservice("ACC-1", "0f" * 32, ["INBOX"])).ok
        for n in range(2):
            deliver(stack.dovecot, "alice", b"Subject: %d\r\n\r\nhi\r\n" % n)
            assert (await stack.standin.next_request()).path == "/3/device/" + "0f" * 32
        assert {r.path for r in stack.standin.requests} == {"/3/device/" + "0f" * 32}
        store.close()
        await phone.logout()
