"""The event spool read live by a running `dovenotify serve`.

A writer process running as Dovecot's mail uid appends lines to its own spool
file, `<event_spool>/<uid>`, as the Lua driver does (one write, O_APPEND). The
service pushes each line within milliseconds, once; a partial line when it is
complete; nothing is lost when the file is set aside while a writer holds it
open; lines left in the spool while the service was away are pushed when it is
back; a file an older dovenotify let another uid make under the mail uid's name
is removed and that uid's devices are pushed. Without inotify, the service says
why once and looks every 0.5 s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from tests.harness.apns_standin import ApnsStandin
from tests.harness.certs import Pki
from tests.harness.dovecot import MAIL_USER, installation
from tests.harness.service import run_service, service_layout
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
ALICE, BOB = "ab" * 32, "cd" * 32
ALICE_NEW = b"MessageNew\talice\tINBOX\tlmtp\n"
BOB_NEW = b"MessageNew\tbob\tINBOX\tlmtp\n"
# Nobody registered carol: lines for her push nobody, they only fill a file.
FILLER = b"MessageNew\tcarol\tINBOX\tlmtp\n"

# Commands on stdin, one a line, each answered `ok` once done: `append HEX` opens
# the file, writes once and closes it, as the driver does; `open`, `write HEX` and
# `close` hold it open in between.
WRITER = textwrap.dedent(
    """
    import sys
    path, held = sys.argv[1], None
    for line in sys.stdin:
        command, _, data = line.strip().partition(" ")
        if command == "append":
            with open(path, "ab", buffering=0) as f:
                f.write(bytes.fromhex(data))
        elif command == "open":
            held = open(path, "ab", buffering=0)
        elif command == "write":
            held.write(bytes.fromhex(data))
        elif command == "close":
            held.close()
        print("ok", flush=True)
    """
)


class Writer:
    """A process running as `uid`, appending to its spool file in `spool`."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process

    def _do(self, command: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline() == "ok\n", self.process.stderr

    async def do(self, command: str, data: bytes = b"") -> None:
        await trio.to_thread.run_sync(self._do, f"{command} {data.hex()}".strip())


@contextmanager
def writer(spool: Path, uid: int) -> Iterator[Writer]:
    with subprocess.Popen(
        ["/usr/bin/python3", "-I", "-c", WRITER, str(spool / str(uid))],
        user=uid,
        group=uid,
        extra_groups=[],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            yield Writer(process)
        finally:
            assert process.stdin is not None
            process.stdin.close()
            process.wait(timeout=10)


async def register(stack: Stack) -> None:
    for user, token in (("alice", ALICE), ("bob", BOB)):
        phone = await stack.iphone(user)
        assert (await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])).ok
        await phone.logout()


def mail_uid(dovecot_version: str) -> int:
    return installation(dovecot_version).uid(MAIL_USER)


async def pushed(stack: Stack) -> str:
    return (await stack.standin.next_request()).path.rsplit("/", 1)[1]


async def nothing_pushed(stack: Stack, seconds: float = 0.3) -> None:
    # Proving that nothing happens takes a while of watching.
    with trio.move_on_after(seconds):
        request = await stack.standin.next_request()
        raise AssertionError(f"unexpected push {request.path}")


async def test_each_spooled_line_is_pushed_at_once_and_once(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        spool = Path(stack.settings["event_spool"])
        with writer(spool, mail_uid(dovecot_version)) as w:
            started = time.monotonic()
            await w.do("append", ALICE_NEW)
            assert await pushed(stack) == ALICE
            print(f"\nappend to push: {(time.monotonic() - started) * 1000:.1f} ms")
            # A second append to the same file: only its own line is handled.
            await w.do("append", BOB_NEW)
            assert await pushed(stack) == BOB
            # Closed with nothing written (the kernel says so all the same).
            await w.do("open")
            await w.do("close")
            # Half a line is held until its rest arrives.
            await w.do("append", ALICE_NEW[:15])
            await nothing_pushed(stack)
            await w.do("append", ALICE_NEW[15:])
            assert await pushed(stack) == ALICE
        await nothing_pushed(stack)
        assert len(stack.standin.requests) == 3
        log = stack.service.log_text()
        assert "made while dovenotify was away" not in log and "Traceback" not in log


async def test_a_file_set_aside_while_a_writer_holds_it_loses_nothing(test_pki, dovecot_version):
    # Files are set aside at half of event_spool_size (or 64 KiB): here 2048 bytes.
    async with run_stack(test_pki, {"event_spool_size": 4096}, version=dovecot_version) as stack:
        await register(stack)
        spool = Path(stack.settings["event_spool"])
        uid = mail_uid(dovecot_version)
        aside = spool / f"{uid}.draining"
        with writer(spool, uid) as held, writer(spool, uid) as w:
            await held.do("open")  # as a driver between its open and its write
            await w.do("append", FILLER * (2048 // len(FILLER) + 1))
            with trio.fail_after(5):
                while not aside.exists():
                    await trio.sleep(0.005)
            # Into the file set aside, after the service read it to its end.
            await held.do("write", ALICE_NEW)
            await held.do("close")
            # A new file takes the name.
            await w.do("append", BOB_NEW)
            assert {await pushed(stack), await pushed(stack)} == {ALICE, BOB}
        with trio.fail_after(5):
            while aside.exists():
                await trio.sleep(0.01)
        await nothing_pushed(stack)
        assert len(stack.standin.requests) == 2


async def test_lines_left_in_the_spool_and_an_older_squatted_file_are_pushed_at_start(
    test_pki, dovecot_version
):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        spool = Path(stack.settings["event_spool"])
        uid = mail_uid(dovecot_version)
        # Lines appended while the service is away are pushed when it is back.
        assert await stack.service.stop() == 0
        with writer(spool, uid) as w:
            await w.do("append", BOB_NEW + BOB_NEW)
        async with run_service(stack.root / "service", stack.settings) as service:
            assert await pushed(stack) == BOB
            await service.wait_for_log("1 event line(s) from the spool of uid")
            await nothing_pushed(stack)
            assert await service.stop() == 0
        # What an older dovenotify's world-writable spool allowed: another uid made
        # the mail uid's file first. Its lines may be anyone's, and the mail uid may
        # have lost its own, which could be for anyone: every device is pushed.
        (spool / str(uid)).unlink()
        squat = spool / str(uid)
        squat.write_bytes(ALICE_NEW)
        os.chown(squat, 4243, 4243)
        async with run_service(stack.root / "service", stack.settings) as service:
            assert {await pushed(stack), await pushed(stack)} == {ALICE, BOB}
            await service.wait_for_log(f"the spool of uid {uid}")
            await nothing_pushed(stack)
            # The mail uid has a file of the service's again.
            assert squat.stat().st_uid == os.geteuid() and squat.stat().st_size == 0
        assert len(stack.standin.requests) == 3


# Takes every inotify instance its user may have, says how many, and holds them
# until its stdin closes.
HOARDER = textwrap.dedent(
    """
    import ctypes, sys
    libc, held = ctypes.CDLL(None, use_errno=True), []
    while (fd := libc.inotify_init1(0)) >= 0:
        held.append(fd)
    print(len(held), ctypes.get_errno(), flush=True)
    sys.stdin.read()
    """
)
# Its own user: taking all of nobody's inotify instances would break the IMAP
# IDLE of Dovecots that other tests run at the same time.
SERVICE = f"dnspool{os.getpid()}"


@pytest.fixture
def service_user() -> Iterator[pwd.struct_passwd]:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(SERVICE)
        subprocess.run(["deluser", "--quiet", SERVICE], check=True, capture_output=True)
    subprocess.run(
        ["adduser", "--quiet", "--system", "--group", "--no-create-home", SERVICE],
        check=True,
    )
    try:
        yield pwd.getpwnam(SERVICE)
    finally:
        subprocess.run(["deluser", "--quiet", SERVICE], check=True, capture_output=True)


async def test_without_inotify_the_spool_is_looked_at_every_half_second(
    test_pki: Pki, apns_standin: ApnsStandin, service_user: pwd.struct_passwd
) -> None:
    certificate = test_pki.client.combined_pem
    root, settings = service_layout(test_pki, apns_standin.url, certificate, SERVICE)
    settings["log_level"] = "debug"
    try:
        with subprocess.Popen(
            ["/usr/bin/python3", "-I", "-c", HOARDER],
            user=service_user.pw_uid,
            group=service_user.pw_gid,
            extra_groups=[],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        ) as hoarder:
            assert hoarder.stdout is not None and hoarder.stdin is not None
            held, error = map(int, hoarder.stdout.readline().split())
            assert held > 0 and error == errno.EMFILE
            async with run_service(root / "service", settings, user=SERVICE) as service:
                await service.wait_for_log("cannot watch the event spool")
                hoarder.stdin.close()
                spool = Path(settings["event_spool"])
                # Root may send events for anyone; doveadm's are not pushed, only logged.
                for mailbox in ("INBOX", "Drafts"):  # each once the service is reading
                    with open(spool / "0", "ab") as f:
                        f.write(b"MessageNew\talice\t%s\tdoveadm\n" % mailbox.encode())
                    await service.wait_for_log(f"ignored MessageNew in {mailbox} from doveadm")
                log = service.log_text()
                assert log.count("cannot watch the event spool") == 1
                assert "fs.inotify.max_user_instances" in log
    finally:
        shutil.rmtree(root)
