"""The event socket of a running `dovenotify serve`: bad lines and unwelcome peers.

Bad lines (malformed, oversized, cut off) are logged once each with the reason
and skipped, and the listener goes on. With `event_peers`, a process that is not
the mail uid (or root) may send events only for its own account's user, by its
SO_PEERCRED credentials, while Dovecot's own events still push.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from pathlib import Path

import attrs
import trio

from dovenotify.core.config import Config
from dovenotify.events.decoder import MAX_LINE
from tests.harness.dovecot import deliver, installation
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "ab" * 32
MESSAGE = b"Subject: hello\r\n\r\nhi\r\n"
# An unprivileged uid other than the mail user (nobody): daemon.
STRANGER_UID = 1
MAX_EVENT_CONNECTIONS = attrs.fields(Config).event_connections.default


async def register(stack: Stack) -> None:
    phone = await stack.iphone("alice")
    assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
    await phone.logout()


def send(path: str, data: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(data)


async def test_bad_lines_are_logged_once_and_skipped(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        path = stack.settings["event_socket"]
        send(
            path,
            b"MessageNew\talice\n"  # too few fields
            + b"Bogus\talice\tINBOX\tlmtp\n"
            + b"MessageNew\talice\t"
            + b"x" * MAX_LINE
            + b"\tlmtp\n"
            + b"MessageNew\talice\tINBOX\tlm",  # cut off by the sender's timeout
        )
        send(path, b"MessageNew\talice\tINBOX\tlmtp\n")
        request = await stack.standin.next_request()
        assert request.path.endswith(TOKEN)
        await stack.service.wait_for_log("incomplete last line")
        log = stack.service.log_text()
        for reason in (
            "expected 4 fields, got 2",
            "unknown event 'Bogus'",
            f"line longer than {MAX_LINE} bytes",
            "incomplete last line",
        ):
            assert log.count(reason) == 1, reason
        assert len(stack.standin.requests) == 1


async def test_only_event_peers_may_send_events_for_other_users(test_pki, dovecot_version):
    mail_uid = installation(dovecot_version).uid("nobody")
    settings = {"event_peers": [str(mail_uid)]}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        await register(stack)
        line = "MessageNew\\talice\\tINBOX\\tlmtp\\n"
        stranger = (
            "import socket; s = socket.socket(socket.AF_UNIX); "
            f"s.connect({stack.settings['event_socket']!r}); s.sendall(b'{line}')"
        )
        # Its send may fail (EPIPE) once the service has hung up on it: no check.
        await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["/usr/bin/python3", "-c", stranger],
                user=STRANGER_UID,
                group=STRANGER_UID,
                capture_output=True,
            )
        )
        await stack.service.wait_for_log(f"(uid {STRANGER_UID} (daemon), gid {STRANGER_UID})")
        assert "refused 1 event(s) from pid " in stack.service.log_text()
        assert stack.standin.requests == []
        # Dovecot's delivery (as the mail uid) still pushes.
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
        request = await stack.standin.next_request()
        assert request.path.endswith(TOKEN)


def open_sockets(pid: int, path: str) -> int:
    """Sockets `pid` holds on the unix socket `path`: its listener and what it accepted.

    Only those: the relay's sockets of an IMAP session that has just logged out
    may still be closing while the test counts.
    """
    on_path = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[7] == path:
            on_path.add(f"socket:[{fields[6]}]")
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        # A descriptor may close between listing and reading it.
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(fd) in on_path
    return count


async def test_a_flood_of_event_connections_is_held_at_the_limit(test_pki):
    # Held open for the whole test, not closed at event_connection_seconds.
    async with run_stack(test_pki, {"event_connection_seconds": 60}, version=None) as stack:
        await register(stack)
        path, pid = stack.settings["event_socket"], stack.service.process.pid
        before = open_sockets(pid, path)
        with contextlib.ExitStack() as held:
            # Connections that say nothing yet, as from deliveries stuck mid-send.
            for _ in range(MAX_EVENT_CONNECTIONS + 44):
                s = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
                s.connect(path)
            queued = held.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            queued.connect(path)
            queued.sendall(b"MessageNew\talice\tINBOX\tlmtp\n")
            queued.shutdown(socket.SHUT_WR)
            with trio.fail_after(10):
                while open_sockets(pid, path) - before < MAX_EVENT_CONNECTIONS:
                    await trio.sleep(0.01)
            # Proving that nothing more is taken needs a while of watching: the
            # service accepts in a loop, so 0.5 s is hundreds of chances to.
            await trio.sleep(0.5)
            assert open_sockets(pid, path) - before == MAX_EVENT_CONNECTIONS
            assert stack.standin.requests == []
        # The connections ended; the one that waited in the queue is read and pushed.
        request = await stack.standin.next_request()
        assert request.path.endswith(TOKEN)
