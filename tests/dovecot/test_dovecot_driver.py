"""The Lua driver inside a real Dovecot: what it writes, and that it never holds mail up.

Each test starts Dovecot with the snippet `render()` produces (post-login helper
replaced by a pass-through), the event spool made as the service makes it
(SpoolSink), and where the driver falls back to the socket, an EventSink on it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from dovenotify.dovecot.config import DEFAULT_EVENT_SPOOL, DEFAULT_EVENT_SPOOL_SIZE, render
from dovenotify.dovecot.files import install_dovecot_files
from tests.harness.dovecot import (
    MAIL_USER,
    Dovecot,
    EventSink,
    SpoolSink,
    StartDovecot,
    deliver,
    deliver_lda,
    make_root,
)
from tests.harness.imap_client import ImapClient

pytestmark = pytest.mark.skipif(
    shutil.which("dovecot") is None or os.geteuid() != 0,
    reason="needs Dovecot installed and root to start it",
)

MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi\r\n"

# Continues the login chain without a relay, so IMAP works through the rendered
# imap-postlogin service without depending on dovenotify's helper.
PASS_THROUGH = """\
#!/bin/sh
while [ "$#" -gt 0 ]; do
  case "$1" in --socket|--timeout|--user-field) shift 2 ;; *) break ;; esac
done
exec "$@"
"""

# Wraps the real script to show what Dovecot passes to FlagsClear.
FLAGS_CLEAR_PROBE = """\
dofile("{script}")
local real = dovecot_lua_notify_event_flags_clear
function dovecot_lua_notify_event_flags_clear(ctx, event)
  local keywords = event.keywords == nil and "nil" or tostring(#event.keywords)
  ctx.lines[#ctx.lines + 1] = string.format(
    "Probe\\tflags=%d\\tkeywords=%s\\n", #event.flags, keywords)
  real(ctx, event)
end
"""

CONTROL_CHARACTERS_PROBE = """\
dofile("{script}")
local real = dovecot_lua_notify_event_message_new
function dovecot_lua_notify_event_message_new(ctx, event)
  real(ctx, event)
  dovecot_lua_notify_event_mailbox_delete(ctx, {{ mailbox = "a\\tb\\r\\nc%d" }})
end
"""

# Says in Dovecot's log which spool file a transaction's lines are for.
PATH_PROBE = """\
dofile("{script}")
local real = dovecot_lua_notify_begin_txn
function dovecot_lua_notify_begin_txn(user)
  local ctx = real(user)
  dovecot.i_info("probe: " .. user.username .. "'s events go to " .. ctx.path)
  return ctx
end
"""

# Makes every transaction bigger than a unix socket's buffer, so that a listener
# that never reads makes the send wait for the timeout.
PADDING = """\
dofile("{script}")
local real = dovecot_lua_notify_event_message_new
function dovecot_lua_notify_event_message_new(ctx, event)
  real(ctx, event)
  ctx.lines[#ctx.lines + 1] = string.rep("x", 1000000) .. "\\n"
end
"""


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A directory for the event socket and test scripts, readable by Dovecot's users.

    It holds the driver as `dovecot-config --install` installs it, precompiled:
    Dovecot in the other version's chroot sees only /tmp of the host.
    """
    root = make_root("dovenotify-events-")
    install_dovecot_files(root)
    assert (root / "dovenotify-driver.luac").is_file()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def write_script(scratch: Path, name: str, text: str, mode: int = 0o644) -> Path:
    path = scratch / name
    path.write_text(text.format(script=scratch / "dovenotify.lua"))
    path.chmod(mode)
    return path


DriverConf = Callable[..., str]


@pytest.fixture
def driver_conf(scratch: Path, dovecot_version: str) -> DriverConf:
    """`driver_conf(lua_script=, timeout=, user_field=, spool_size=)`: the rendered
    snippet for the Dovecot under test, its event socket and spool in `scratch`."""

    def conf(
        *,
        lua_script: Path | None = None,
        timeout: float = 0.2,
        user_field: str | None = None,
        spool_size: int = DEFAULT_EVENT_SPOOL_SIZE,
    ) -> str:
        helper = write_script(scratch, "pass-through.sh", PASS_THROUGH, 0o755)
        return render(
            dovecot_version,
            lua_script=lua_script or scratch / "dovenotify.lua",
            event_socket=scratch / "events.sock",
            event_timeout=timeout,
            event_spool=scratch / "events.spool",
            event_spool_size=spool_size,
            helper_command=[str(helper)],
            relay_socket=scratch / "relay.sock",
            relay_timeout=0.5,
            user_field=user_field,
        )

    return conf


async def imap_login(d: Dovecot, user: str = "alice") -> ImapClient:
    client = await ImapClient.connect(d.host, d.imap_port)
    await client.login(user, "secret")
    return client


def spool_of(d: Dovecot, scratch: Path) -> SpoolSink:
    """The spool, with a file for Dovecot's mail uid, as the service makes them."""
    return SpoolSink(scratch / "events.spool", [d.installation.uid(MAIL_USER)])


async def wait_lines(sink: EventSink | SpoolSink, predicate) -> None:
    await trio.to_thread.run_sync(sink.wait_for, predicate)


def test_lmtp_delivery_sends_one_message_new(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    deliver(d, "alice", MESSAGE)
    deliver(d, "alice", MESSAGE)
    # One line per transaction. The first delivery also creates INBOX, in a
    # transaction of its own, which the driver does not write: nobody is pushed
    # for a new mailbox.
    assert sink.wait_lines(2) == ["MessageNew\talice\tINBOX\tlmtp\n"] * 2
    assert warnings(d) == []


def test_empty_settings_mean_the_defaults(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    # An admin who blanks a setting gets its default, not a driver that fails.
    conf = driver_conf(lua_script=write_script(scratch, "probe.lua", PATH_PROBE))
    for name in ("dovenotify_timeout", "dovenotify_spool"):
        conf, found = re.subn(rf"(?m)^(\s*{name} =).*$", r"\1", conf)
        assert found == 1
    # A blank user field: the username as Dovecot reports it.
    conf = conf.replace(
        "dovenotify_socket =",
        "dovenotify_user_field =\n  dovenotify_spool_size =\n  dovenotify_socket =",
    )
    d = dovecot_factory(extra_conf=conf)
    with EventSink(scratch / "events.sock") as sink:
        deliver(d, "alice", MESSAGE)
        uid = d.installation.uid(MAIL_USER)
        d.wait_for_log(f"(?m)Info: probe: alice's events go to {DEFAULT_EVENT_SPOOL}/{uid}$")
        # Where that is missing (a machine without dovenotify), the socket got them.
        if not (DEFAULT_EVENT_SPOOL / str(uid)).exists():
            sink.wait_for(lambda s: len(s.payloads) == 1)
            assert sink.payloads == [b"MessageNew\talice\tINBOX\tlmtp\n"]
    assert warnings(d) == []


def test_a_uid_without_a_spool_file_sends_to_the_socket(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    # The service makes a uid's file when that uid first sends to the socket.
    d = dovecot_factory(extra_conf=driver_conf())
    sink = SpoolSink(scratch / "events.spool", [])
    with EventSink(scratch / "events.sock") as socket_sink:
        deliver(d, "alice", MESSAGE)
        socket_sink.wait_for(lambda s: len(s.payloads) == 1)
    assert socket_sink.payloads == [b"MessageNew\talice\tINBOX\tlmtp\n"]
    assert list(sink.path.iterdir()) == []
    assert warnings(d) == []


def test_a_full_spool_file_sends_to_the_socket_and_else_says_so_once(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    line = b"MessageNew\talice\tINBOX\tlmtp\n"
    d = dovecot_factory(extra_conf=driver_conf(spool_size=2 * len(line) + 1))
    sink = spool_of(d, scratch)
    (kept,) = sink.path.iterdir()
    with EventSink(scratch / "events.sock") as socket_sink:
        for _ in range(3):
            deliver(d, "alice", MESSAGE)
        socket_sink.wait_for(lambda s: len(s.payloads) == 1)
    assert kept.read_bytes() == 2 * line
    assert socket_sink.payloads == [line]
    # The service away too: one line past the size has it push every device of
    # the uid when it is back; nothing after that.
    deliver(d, "alice", MESSAGE)
    deliver(d, "alice", MESSAGE)
    assert kept.read_bytes() == 2 * line + b"SpoolFull\talice\t\tlmtp\n"
    d.wait_for_log(
        r"Warning: dovenotify: 1 event\(s\) not sent: cannot append to \S+ \(it is full"
        r" \(dovenotify_spool_size\)\) nor send to \S+ \(connect: .+\); dovenotify will push"
        r" every device of this uid when it is back"
    )
    assert len(warnings(d)) == 2


def test_precompiled_driver_runs_without_its_source(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    # The bytecode made at install time matches the Lua of the Dovecot under
    # test (2.4 runs in a chroot with a later Lua 5.4 release than the host's).
    (scratch / "dovenotify-driver.lua").unlink()
    (scratch / "dovenotify-loader.lua").unlink()
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    deliver(d, "alice", MESSAGE)
    assert sink.wait_lines(1) == ["MessageNew\talice\tINBOX\tlmtp\n"]
    assert warnings(d) == []


def another_lua(bytecode: bytes) -> bytes:
    # Byte 4 of the header is the Lua version (0x54 for 5.4): what Lua 5.3 writes there.
    assert bytecode.startswith(b"\x1bLua\x54")
    return b"\x1bLua\x53" + bytecode[5:]


def truncated(bytecode: bytes) -> bytes:
    return bytecode[: len(bytecode) - 100]


@pytest.mark.parametrize("spoil", [another_lua, truncated])
def test_bytecode_that_does_not_load_falls_back_to_the_source(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf, spoil
):
    bytecode = scratch / "dovenotify-driver.luac"
    spoiled = spoil(bytecode.read_bytes())
    assert spoiled != bytecode.read_bytes()
    bytecode.write_bytes(spoiled)
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    deliver(d, "alice", MESSAGE)
    assert sink.wait_lines(1) == ["MessageNew\talice\tINBOX\tlmtp\n"]
    d.wait_for_log(
        r"Warning: dovenotify: \S+/dovenotify-driver.luac: .+; using the source instead,"
        r" which is slower: run `dovenotify dovecot-config --install` again"
    )


def test_without_the_driver_mail_is_delivered_and_the_log_says_why(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    for name in ("dovenotify-driver.lua", "dovenotify-driver.luac"):
        (scratch / name).unlink()
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    with EventSink(scratch / "events.sock") as socket_sink:
        # Raised while Dovecot loads the script, not from a hook (which would
        # make Dovecot panic after saving the mail, and the LMTP client would
        # see the connection drop): logged, and no hook runs.
        deliver(d, "alice", MESSAGE)
        d.wait_for_log(
            r"Error: .*dovenotify: cannot open \S+/dovenotify-driver.lua.*; "
            r"run `dovenotify dovecot-config --install`"
        )
    sink.poll()
    assert sink.lines == [] and socket_sink.payloads == []
    assert len(list((d.layout.homes / "alice" / "Maildir" / "new").iterdir())) == 1
    assert "Panic" not in d.log_text()


def test_lda_delivery_sends_message_new(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    deliver_lda(d, "alice", MESSAGE)
    assert sink.wait_lines(1) == ["MessageNew\talice\tINBOX\tlda\n"]


async def test_imap_append_sends_message_append(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    client = await imap_login(d)
    assert (await client.append("INBOX", MESSAGE)).ok
    await client.logout()
    await wait_lines(sink, lambda s: any("MessageAppend" in line for line in s.lines))
    assert "MessageAppend\talice\tINBOX\timap\n" in sink.lines
    assert all(line.endswith("\timap\n") for line in sink.lines)


async def test_mailbox_names_are_escaped(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    d = dovecot_factory(extra_conf=driver_conf())
    sink = spool_of(d, scratch)
    client = await imap_login(d)
    assert (await client.command('CREATE "100% sure"')).ok
    assert (await client.append("100% sure", MESSAGE)).ok
    # IMAP names are modified UTF-7; the driver sends UTF-8.
    assert (await client.command('RENAME "100% sure" "Entw&APw-rfe 100%"')).ok
    await client.logout()
    await wait_lines(sink, lambda s: any("MailboxRename" in line for line in s.lines))
    assert "MessageAppend\talice\t100%25 sure\timap\n" in sink.lines
    # The old name rides along as a fifth field.
    assert "MailboxRename\talice\tEntwürfe 100%25\timap\t100%25 sure\n" in sink.lines


def test_control_characters_are_escaped(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    # Dovecot refuses control characters in new mailbox names, but old
    # mailboxes on disk may have them: feed one through the driver in Dovecot.
    probe = write_script(scratch, "probe.lua", CONTROL_CHARACTERS_PROBE)
    d = dovecot_factory(extra_conf=driver_conf(lua_script=probe))
    sink = spool_of(d, scratch)
    deliver(d, "alice", MESSAGE)
    sink.wait_for(lambda s: any("MailboxDelete" in line for line in s.lines))
    assert "MailboxDelete\talice\ta%09b%0D%0Ac%25d\tlmtp\n" in sink.lines


async def test_empty_flags_clear_is_not_sent(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    probe = write_script(scratch, "probe.lua", FLAGS_CLEAR_PROBE)
    d = dovecot_factory(extra_conf=driver_conf(lua_script=probe))
    deliver(d, "alice", MESSAGE)  # no spool yet, nor a socket: this event is lost
    sink = spool_of(d, scratch)
    client = await imap_login(d)
    assert (await client.command("SELECT INBOX")).ok
    assert (await client.command("STORE 1 +FLAGS (\\Seen)")).ok
    await wait_lines(sink, lambda s: any("FlagsSet" in line for line in s.lines))
    seen_lines = list(sink.lines)
    assert (await client.command("STORE 1 -FLAGS (\\Seen)")).ok
    await client.logout()
    await wait_lines(sink, lambda s: len(s.lines) > len(seen_lines) + 1)
    # Setting \Seen makes Dovecot report a FlagsClear that clears nothing
    # (\Recent went away but is not listed); the driver drops it.
    assert "Probe\tflags=0\tkeywords=0\n" in seen_lines
    assert "FlagsSet\talice\tINBOX\timap\n" in seen_lines
    assert not [line for line in seen_lines if line.startswith("FlagsClear")]
    # Clearing a real flag is sent.
    assert "Probe\tflags=1\tkeywords=0\n" in sink.lines
    assert "FlagsClear\talice\tINBOX\timap\n" in sink.lines


async def test_user_field_replaces_the_username(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    d = dovecot_factory(
        extra_conf=driver_conf(user_field="push_user"),
        userdb_fields={"alice": {"push_user": "alice@example.org"}},
    )
    sink = spool_of(d, scratch)
    await trio.to_thread.run_sync(deliver, d, "alice", MESSAGE)
    await trio.to_thread.run_sync(deliver, d, "bob", MESSAGE)
    client = await imap_login(d)
    assert (await client.append("INBOX", MESSAGE)).ok
    await client.logout()
    await wait_lines(sink, lambda s: any("MessageAppend" in line for line in s.lines))
    assert "MessageNew\talice@example.org\tINBOX\tlmtp\n" in sink.lines
    assert "MessageAppend\talice@example.org\tINBOX\timap\n" in sink.lines
    # Without the field the login name is used.
    assert "MessageNew\tbob\tINBOX\tlmtp\n" in sink.lines


# --- a missing or stuck dovenotify must not hold up delivery --------------------
# Without a spool file to append to, the driver sends to the socket; whatever
# is wrong there, it waits no longer than dovenotify_timeout.

TIMEOUT = 0.2
ROUNDS = 3


def median_delivery(d: Dovecot) -> float:
    return statistics.median(deliver(d, "alice", MESSAGE) for _ in range(ROUNDS))


def warnings(d: Dovecot) -> list[str]:
    """What the driver logged, but for debug lines (those say what went where)."""
    return [
        line for line in d.log_text().splitlines() if "dovenotify:" in line and "Debug:" not in line
    ]


@pytest.fixture
def timed(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
) -> tuple[Dovecot, float]:
    """Dovecot with the driver, its median delivery time with the spool, and the
    spool then gone: the driver turns to the socket."""
    d = dovecot_factory(extra_conf=driver_conf(timeout=TIMEOUT))
    sink = spool_of(d, scratch)
    deliver(d, "alice", MESSAGE)  # first delivery creates INBOX: not typical
    healthy = median_delivery(d)
    sink.wait_lines(ROUNDS + 1)
    shutil.rmtree(scratch / "events.spool")
    print(f"\nLMTP delivery, appending to the spool: {healthy * 1000:.1f} ms")
    return d, healthy


def test_delivery_without_socket_file(timed: tuple[Dovecot, float]):
    d, healthy = timed
    elapsed = median_delivery(d)
    print(f"LMTP delivery, no socket: {elapsed * 1000:.1f} ms")
    assert elapsed < healthy + 2 * TIMEOUT
    d.wait_for_log(r"Warning: dovenotify: 1 event\(s\) not sent: .*connect: No such file")


def test_delivery_with_stale_socket_file(timed: tuple[Dovecot, float], scratch: Path):
    d, healthy = timed
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(scratch / "events.sock"))
    stale.close()
    (scratch / "events.sock").chmod(0o666)
    elapsed = median_delivery(d)
    print(f"LMTP delivery, stale socket file: {elapsed * 1000:.1f} ms")
    assert elapsed < healthy + 2 * TIMEOUT
    d.wait_for_log(r"Warning: dovenotify: .*connect: connection refused")


def test_delivery_with_listener_that_never_accepts(timed: tuple[Dovecot, float], scratch: Path):
    d, healthy = timed
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(scratch / "events.sock"))
        (scratch / "events.sock").chmod(0o666)
        server.listen(0)
        # Fill the backlog so that further connects are refused.
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.connect(str(scratch / "events.sock"))
        with filler:
            elapsed = median_delivery(d)
    print(f"LMTP delivery, full backlog: {elapsed * 1000:.1f} ms")
    assert elapsed < healthy + 2 * TIMEOUT
    d.wait_for_log(r"Warning: dovenotify: 1 event\(s\) not sent")


def test_delivery_with_listener_that_never_reads(timed: tuple[Dovecot, float], scratch: Path):
    d, healthy = timed
    with EventSink(scratch / "events.sock", hang=True) as sink:
        elapsed = median_delivery(d)
        connections = sink.connections
    print(f"LMTP delivery, listener never reads: {elapsed * 1000:.1f} ms")
    assert elapsed < healthy + 2 * TIMEOUT
    # A few lines fit in the socket buffer: the send completes, nothing to warn about.
    assert connections == ROUNDS
    assert warnings(d) == []


def test_send_larger_than_socket_buffer_stops_at_timeout(
    dovecot_factory: StartDovecot, scratch: Path, driver_conf: DriverConf
):
    padded = write_script(scratch, "padded.lua", PADDING)
    d = dovecot_factory(extra_conf=driver_conf(lua_script=padded, timeout=TIMEOUT))
    with EventSink(scratch / "events.sock", hang=True):
        deliver(d, "alice", MESSAGE)  # creates INBOX
        elapsed = median_delivery(d)
    print(f"LMTP delivery, 1 MB to a listener that never reads: {elapsed * 1000:.1f} ms")
    assert TIMEOUT * 0.9 < elapsed < 2 * TIMEOUT
    d.wait_for_log(r"Warning: dovenotify: \d+ event\(s\) not sent: .*send: timeout after \d+ of")
