"""Which events push which devices, and when: facts.md §2's event table on the real stack.

Each test runs Dovecot (both versions) + `dovenotify serve` + the APNs stand-in,
registers simulated iPhones for mailbox lists over the real relay, changes mail
the way a user or an MTA does, and reads the pushes the stand-in received.
`delay` and `max_delay` are short (2 s, 4 s) so that timing is measured, not assumed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.harness.dovecot import deliver, make_root
from tests.harness.imap_client import ImapClient
from tests.harness.mailconf import push_plugins_for_doveadm, sieve_before
from tests.harness.stack import Stack, run_stack

DELAY = 2.0
MAX_DELAY = 4.0
TIMING = {"delay": DELAY, "max_delay": MAX_DELAY}
# The bound on measured delays.
TOLERANCE = 1.0
MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi\r\n"


def token(n: int) -> str:
    return f"{n:02x}" * 32


def account(n: int) -> str:
    return f"0715A26B-CA09-4730-A419-7930000000{n:02X}"


async def register(stack: Stack, n: int, mailboxes: list[str], user: str = "alice") -> ImapClient:
    """Phone `n` registers for `mailboxes`; its session stays open for the test to use."""
    phone = await stack.iphone(user)
    reply = await phone.xapplepushservice(account(n), token(n), mailboxes)
    assert reply.ok, reply
    # Each mailbox confirmed, so iOS pushes beyond INBOX (facts.md §1).
    confirmed = [f'* XAPPLEPUSHSERVICE "mailbox" "{m}"'.encode() for m in mailboxes]
    assert list(reply.untagged[: len(mailboxes)]) == confirmed
    return phone


async def next_push(stack: Stack, timeout: float = 10) -> tuple[int, float]:
    """(phone number, monotonic time) of the next push the stand-in receives."""
    request = await stack.standin.next_request(timeout)
    device = request.path.rsplit("/", 1)[1]
    return int(device[:2], 16), time.monotonic()


async def phones_pushed(stack: Stack, count: int) -> list[int]:
    return [(await next_push(stack))[0] for _ in range(count)]


async def ok(phone: ImapClient, command: str) -> None:
    reply = await phone.command(command)
    assert reply.ok, reply


async def lmtp(stack: Stack, rcpt: str = "alice", message: bytes = MESSAGE) -> None:
    await trio.to_thread.run_sync(deliver, stack.dovecot, rcpt, message)


async def test_lmtp_delivery_pushes_at_once(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        await register(stack, 1, ["INBOX"])
        start = time.monotonic()
        await lmtp(stack)
        phone, at = await next_push(stack)
        assert phone == 1
        assert at - start < 1.0, "new mail must not wait for `delay`"


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory Dovecot's users can read (pytest's are private), also in the chroot."""
    root = make_root("dovenotify-semantics-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def test_sieve_fileinto_pushes_the_devices_of_that_folder(test_pki, dovecot_version, scratch):
    script = scratch / "work.sieve"
    script.write_text(
        'require ["fileinto", "mailbox"];\n'
        'if header :contains "subject" "work" { fileinto :create "Work"; }\n'
    )
    script.chmod(0o644)
    conf = sieve_before(dovecot_version, script)
    async with run_stack(test_pki, TIMING, version=dovecot_version, dovecot_conf=conf) as stack:
        await register(stack, 1, ["INBOX"])
        await register(stack, 2, ["INBOX", "Work"])
        await register(stack, 3, ["Work"])
        await lmtp(stack, message=b"Subject: work item\r\n\r\nfiled by Sieve\r\n")
        assert sorted(await phones_pushed(stack, 2)) == [2, 3]
        # Only INBOX phones for a mail Sieve leaves in INBOX; nothing else was queued.
        await lmtp(stack, message=MESSAGE)
        assert sorted(await phones_pushed(stack, 2)) == [1, 2]
        assert len(stack.standin.requests) == 4


async def test_append_copy_and_move_push_the_target_at_once(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        inbox_phone = await register(stack, 1, ["INBOX"])
        await register(stack, 2, ["Archive"])
        await ok(inbox_phone, "CREATE Archive")
        for _ in range(3):
            assert (await inbox_phone.append("INBOX", MESSAGE)).ok
            assert await phones_pushed(stack, 1) == [1]
        await ok(inbox_phone, "SELECT INBOX")

        assert (await inbox_phone.append("Archive", MESSAGE)).ok
        assert await phones_pushed(stack, 1) == [2]
        start = time.monotonic()
        await ok(inbox_phone, "COPY 1 Archive")
        phone, at = await next_push(stack)
        assert (phone, at - start < 1.0) == (2, True)

        # MOVE: new in Archive at once; gone from INBOX, which waits `delay`.
        start = time.monotonic()
        await ok(inbox_phone, "MOVE 2 Archive")
        phone, at = await next_push(stack)
        assert (phone, at - start < 1.0) == (2, True)
        phone, at = await next_push(stack)
        assert phone == 1
        assert at - start == pytest.approx(DELAY, abs=TOLERANCE)


async def test_flags_and_expunge_push_once_after_delay(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        phone = await register(stack, 1, ["INBOX"])
        for _ in range(2):
            await lmtp(stack)
        assert await phones_pushed(stack, 2) == [1, 1]
        await ok(phone, "SELECT INBOX")
        # Read, flagged, unflagged, trashed and expunged: one burst, one push.
        await ok(phone, "STORE 1 +FLAGS (\\Seen)")
        await ok(phone, "STORE 1 +FLAGS (\\Flagged)")
        await ok(phone, "STORE 1 -FLAGS (\\Flagged)")
        await ok(phone, "STORE 2 +FLAGS (\\Deleted)")
        await ok(phone, "EXPUNGE")
        last_change = time.monotonic()
        number, at = await next_push(stack)
        assert number == 1
        assert at - last_change == pytest.approx(DELAY, abs=TOLERANCE)
        # Nothing else is pending: a new mail is the very next push.
        await lmtp(stack)
        assert await phones_pushed(stack, 1) == [1]
        assert len(stack.standin.requests) == 4


async def test_max_delay_bounds_continuous_activity(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        phone = await register(stack, 1, ["INBOX"])
        await lmtp(stack)
        await next_push(stack)
        await ok(phone, "SELECT INBOX")
        first_change = time.monotonic()
        pushes: list[float] = []
        # A change every 0.5 s for 6 s: `delay` alone would postpone the push to the end.
        async with trio.open_nursery() as nursery:

            async def collect() -> None:
                while True:
                    pushes.append((await next_push(stack))[1])

            nursery.start_soon(collect)
            for i in range(12):
                await ok(phone, f"STORE 1 {'+' if i % 2 == 0 else '-'}FLAGS (\\Flagged)")
                await trio.sleep(0.5)  # the pace of the activity under test
            nursery.cancel_scope.cancel()
        assert pushes, "continuous activity postponed the push past max_delay"
        assert pushes[0] - first_change == pytest.approx(MAX_DELAY, abs=TOLERANCE)


async def test_one_push_per_device_for_500_messages_copied_at_once(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        phone = await register(stack, 1, ["INBOX"])
        await ok(phone, "CREATE Archive")
        await ok(phone, "CREATE Copies")
        # 500 pipelined APPENDs (non-synchronizing literals): nobody registered Archive.
        literal = f"{{{len(MESSAGE)}+}}\r\n".encode() + MESSAGE + b"\r\n"
        tags = [phone.new_tag() for _ in range(500)]
        await phone.send_raw(b"".join(f"{t} APPEND Archive ".encode() + literal for t in tags))
        for t in tags:
            assert (await phone.read_until_tagged(t)).ok
        await register(stack, 2, ["Copies"])
        await register(stack, 3, ["INBOX", "Copies"])
        await ok(phone, "SELECT Archive")
        await ok(phone, "COPY 1:500 Copies")
        assert sorted(await phones_pushed(stack, 2)) == [2, 3]
        # A mail to INBOX afterwards is the next push: no more for the copy.
        await lmtp(stack)
        assert sorted(await phones_pushed(stack, 2)) == [1, 3]
        assert len(stack.standin.requests) == 4


async def test_mailbox_create_rename_delete(test_pki, dovecot_version):
    async with run_stack(test_pki, TIMING, version=dovecot_version) as stack:
        phone = await register(stack, 1, ["INBOX", "Projects", "Old"])
        await register(stack, 2, ["INBOX"])
        start = time.monotonic()
        await ok(phone, "CREATE Projects")
        await ok(phone, "CREATE Old")
        await ok(phone, "RENAME Projects Done")
        await ok(phone, "DELETE Old")
        # Only the device that registered the renamed/deleted mailboxes, once, after `delay`.
        number, at = await next_push(stack)
        assert number == 1
        assert at - start == pytest.approx(DELAY, abs=TOLERANCE)
        # CREATE pushed nobody: the marker mail is the next push for phone 2.
        await lmtp(stack)
        assert sorted(await phones_pushed(stack, 2)) == [1, 2]
        assert len(stack.standin.requests) == 3


@pytest.mark.parametrize("push_services", [None, ["imap", "lmtp", "doveadm"]])
async def test_doveadm_changes_push_only_when_configured(test_pki, dovecot_version, push_services):
    settings = dict(TIMING)
    if push_services:
        settings["push_services"] = push_services
    conf = push_plugins_for_doveadm(dovecot_version)
    async with run_stack(test_pki, settings, version=dovecot_version, dovecot_conf=conf) as stack:
        await register(stack, 1, ["INBOX"])
        await register(stack, 2, ["INBOX"], user="bob")
        d = stack.dovecot
        save = d.installation.command(
            "doveadm", "-c", str(d.conf_path), "save", "-u", "alice", "-m", "INBOX"
        )
        await trio.run_process(save, stdin=MESSAGE)
        await stack.service.wait_for_log(" from doveadm" if not push_services else "push ")
        await lmtp(stack, rcpt="bob")
        pushed = []
        while (number := (await next_push(stack))[0]) != 2:
            pushed.append(number)
        assert pushed == ([1] if push_services else [])
