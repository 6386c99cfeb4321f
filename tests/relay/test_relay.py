"""The relay between a real iPhone-like client and a real Dovecot: IMAP stays IMAP.

Every test logs in over TLS through Dovecot's post-login hook, so each session
passes through `dovenotify serve`'s relay exactly as in production.
"""

import contextlib
import hashlib
import os
import re
import resource
import signal
import socket
import sqlite3
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from dovenotify.store.base import Registration
from dovenotify.store.sqlite import SQLiteStore
from tests.harness.certs import Pki
from tests.harness.dovecot import deliver
from tests.harness.handoff import hand_over, relays
from tests.harness.imap_client import ImapClient
from tests.harness.stack import SYSTEM_PYTHON, Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"
OTHER_TOKEN = "aa" * 32


async def devices(stack: Stack) -> list[Registration]:
    def read() -> list[Registration]:
        store = SQLiteStore(Path(stack.settings["database"]))
        try:
            return store.devices()
        finally:
            store.close()

    return await trio.to_thread.run_sync(read)


def alice_relayed_bob_not(pki: Pki, version: str) -> contextlib.AbstractAsyncContextManager[Stack]:
    """A stack whose relay takes alice's sessions (relay_only_field) and not bob's."""
    return run_stack(
        pki, {"relay_only_field": "push"}, version=version, userdb_fields={"alice": {"push": "yes"}}
    )


def ios_command(tag: str, **changes: str) -> bytes:
    """What iOS sends, with some arguments replaced by raw text."""
    args = {
        "version": '"aps-version" "2"',
        "account": f'"aps-account-id" "{ACCOUNT}"',
        "token": f'"aps-device-token" "{TOKEN}"',
        "subtopic": '"aps-subtopic" "com.apple.mobilemail"',
        "mailboxes": '"mailboxes" ("INBOX" "Notes")',
        **changes,
    }
    return f"{tag} XAPPLEPUSHSERVICE {' '.join(a for a in args.values() if a)}\r\n".encode()


async def test_pipelined_commands_get_their_answers_in_command_order(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        await phone.send_raw(b"p1 NOOP\r\n" + ios_command("p2") + b"p3 NOOP\r\n")
        lines = [await phone.read_response() for _ in range(6)]
        # Dovecot adds timings to its own answers: compare their first words only.
        assert lines[0].startswith(b"p1 OK NOOP completed")
        assert lines[1:5] == [
            b'* XAPPLEPUSHSERVICE "mailbox" "INBOX"',
            b'* XAPPLEPUSHSERVICE "mailbox" "Notes"',
            b'* XAPPLEPUSHSERVICE aps-version "2" aps-topic "%s"' % test_pki.client.topic.encode(),
            b"p2 OK XAPPLEPUSHSERVICE completed.",
        ]
        assert lines[5].startswith(b"p3 OK NOOP completed")
        await phone.logout()


async def test_idle_sees_new_mail(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        assert (await phone.command("SELECT INBOX")).ok
        await phone.send_raw(b"i1 IDLE\r\n")
        assert (await phone.read_response()).startswith(b"+ ")
        deliver(stack.dovecot, "alice", b"Subject: while idle\r\n\r\nhi\r\n")
        assert await phone.read_response() == b"* 1 EXISTS"
        await phone.send_raw(b"DONE\r\n")
        assert (await phone.read_until_tagged("i1")).ok
        await phone.logout()


HIBERNATION = """
imap_hibernate_timeout = 1s
# Says when a session is handed to imap-hibernate.
log_debug = category=imap
# Hibernation needs this with or without dovenotify: imap-hibernate (running as
# the internal user) hands woken sessions back through this socket.
service imap {
  unix_listener imap-master {
    user = dovecot
  }
}
"""


async def test_hibernated_idle_session_wakes_for_new_mail(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version, dovecot_conf=HIBERNATION) as stack:
        phone = await stack.iphone()
        assert (await phone.command("SELECT INBOX")).ok
        await phone.send_raw(b"i1 IDLE\r\n")
        assert (await phone.read_response()).startswith(b"+ ")
        await trio.to_thread.run_sync(
            stack.dovecot.wait_for_log, r"Successfully hibernated imap client", 10
        )
        deliver(stack.dovecot, "alice", b"Subject: while asleep\r\n\r\nhi\r\n")
        assert await phone.read_response() == b"* 1 EXISTS"
        await phone.send_raw(b"DONE\r\n")
        assert (await phone.read_until_tagged("i1")).ok
        assert (await phone.command("NOOP")).ok
        await phone.logout()


def big_message(size: int) -> bytes:
    """A CRLF message of `size` bytes whose body looks like IMAP commands and literals."""
    head = b"From: a@example.org\r\nSubject: big\r\n\r\n"
    tricky = b"x1 XAPPLEPUSHSERVICE mailboxes (INBOX)\r\ny1 APPEND INBOX {5}\r\nz1 NOOP\r\n"
    line = hashlib.sha256(b"seed").hexdigest().encode() * 2 + b"\r\n"
    block = tricky + line * ((65536 - len(tricky)) // len(line))
    body = block * ((size - len(head)) // len(block) + 1)
    message = head + body[: size - len(head) - 2] + b"\r\n"
    assert len(message) == size
    return message


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
async def test_50_mb_append_and_fetch_are_byte_exact(test_pki, dovecot_version, tls):
    # Over TLS the relay talks to imap-login through a unix socket; in plain IMAP
    # it has the client's TCP socket itself. The literals go by splice, except
    # the plain FETCH's, which is copied into the TCP socket.
    message = big_message(50 * 1024 * 1024 + 7)
    async with run_stack(test_pki, version=dovecot_version) as stack:
        if tls:
            phone = await stack.iphone()
        else:
            phone = await ImapClient.connect(stack.dovecot.host, stack.dovecot.imap_port)
            await phone.login("alice", "secret")
        assert (await phone.append("INBOX", message)).ok
        assert (await phone.command("SELECT INBOX")).ok
        fetch = await phone.command("FETCH 1 (RFC822.SIZE BODY.PEEK[])")
        assert fetch.ok, fetch
        (line,) = fetch.untagged_starting(b"1 FETCH")
        literal = b"BODY[] {%d}\r\n" % len(message)
        assert b"RFC822.SIZE %d" % len(message) in line
        start = line.index(literal) + len(literal)
        assert hashlib.sha256(line[start : start + len(message)]).digest() == (
            hashlib.sha256(message).digest()
        )
        # The session is still in step after 100 MB went through.
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        await phone.logout()


async def test_logout_ends_the_session_as_dovecot_does(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        reply = await phone.command("LOGOUT")
        assert reply.ok
        assert reply.untagged[0].startswith(b"* BYE")
        with pytest.raises(EOFError):
            await phone.read_response()
        await phone.aclose()


# A short literal passes through the scanner; a long one goes by splice.
@pytest.mark.parametrize("size", [1000, 4 * 1024 * 1024])
async def test_client_gone_in_the_middle_of_a_literal(test_pki, dovecot_version, size):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        await phone.send_raw(b"a1 APPEND INBOX {%d}\r\n" % size)
        assert (await phone.read_response()).startswith(b"+")
        await phone.send_raw(b"Subject: cut short\r\n\r\n" + b"x" * (size // 2))
        await phone.aclose()
        # Dovecot saw the client go, in the middle of its APPEND...
        await trio.to_thread.run_sync(
            stack.dovecot.wait_for_log, r"Disconnected: Connection closed \(While .*APPEND"
        )
        # ...stored nothing, and the relay goes on serving.
        phone = await stack.iphone()
        status = await phone.command("STATUS INBOX (MESSAGES)")
        assert status.untagged_starting(b"STATUS") == [b"* STATUS INBOX (MESSAGES 0)"]
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        await phone.logout()


async def test_dovecot_closing_the_session_closes_the_client(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        assert (await phone.command("SELECT INBOX")).ok
        kick = stack.dovecot.installation.command(
            "doveadm", "-c", str(stack.dovecot.conf_path), "kick", "alice"
        )
        await trio.run_process(kick, capture_stdout=True)
        assert (await phone.read_response()).startswith(b"* BYE")
        with pytest.raises(EOFError):
            await phone.read_response()
        await phone.aclose()


BAD_INPUT = [
    ({"version": '"aps-version" "1"'}, "aps-version 1 is not supported"),
    ({"token": '"aps-device-token" ""'}, "aps-device-token is empty"),
    ({"token": '"aps-device-token" "not-hex"'}, "aps-device-token must be hexadecimal"),
    ({"token": f'"aps-device-token" "{"ab" * 101}"'}, "longer than 200 characters"),
    ({"subtopic": '"aps-subtopic" "com.example"'}, "aps-subtopic must be com.apple.mobilemail"),
    ({"mailboxes": ""}, "mailboxes is missing"),
    ({"mailboxes": '"mailboxes" ("INBOX" "Notes"'}, "unbalanced parentheses"),
    ({"mailboxes": f'"mailboxes" ("{"x" * 10 * 1024 * 1024}")'}, "the command line is too long"),
]


async def test_bad_registrations_get_bad_naming_the_problem_and_the_session_goes_on(
    test_pki, dovecot_version
):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        for n, (changes, problem) in enumerate(BAD_INPUT):
            await phone.send_raw(ios_command(f"b{n}", **changes))
            reply = await phone.read_until_tagged(f"b{n}")
            assert reply.status == "BAD", (problem, reply.tagged[:200])
            assert problem.encode() in reply.tagged, reply.tagged[:200]
            assert reply.untagged == ()
            assert (await phone.command("NOOP")).ok
        assert await devices(stack) == []
        await phone.logout()


async def test_two_devices_restored_from_one_backup_both_get_pushes(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        for token in (TOKEN, OTHER_TOKEN):
            phone = await stack.iphone()
            assert (await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])).ok
            await phone.logout()
        registered = await devices(stack)
        assert sorted((d.account_id, d.device_token) for d in registered) == sorted(
            [(ACCOUNT, TOKEN), (ACCOUNT, OTHER_TOKEN)]
        )
        deliver(stack.dovecot, "alice", b"Subject: for both\r\n\r\nhi\r\n")
        pushed = {(await stack.standin.next_request()).path for _ in range(2)}
        assert pushed == {f"/3/device/{TOKEN}", f"/3/device/{OTHER_TOKEN}"}


async def test_registering_again_updates_mailboxes_and_time(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        registered = []
        # iOS registers once per session, at its start.
        for mailboxes in (["INBOX"], ["INBOX", "Notes"]):
            phone = await stack.iphone()
            assert (await phone.xapplepushservice(ACCOUNT, TOKEN, mailboxes)).ok
            registered += await devices(stack)
            await phone.logout()
        first, second = registered
        assert first.mailboxes == ("INBOX",)
        assert second.mailboxes == ("INBOX", "Notes")
        assert second.registered_at > first.registered_at


async def test_registration_is_on_disk_before_the_ok(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        # No chance to flush anything after the OK.
        stack.service.process.kill()
        await stack.service.process.wait()
        with contextlib.closing(sqlite3.connect(stack.settings["database"])) as db:
            rows = db.execute("SELECT username, account_id, device_token FROM registrations")
            assert rows.fetchall() == [("alice", ACCOUNT, TOKEN)]
        await phone.aclose()


async def test_sighup_keeps_relayed_sessions(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        assert (await phone.command("SELECT INBOX")).ok
        stack.service.process.send_signal(signal.SIGHUP)
        await stack.service.wait_for_log("reload")
        # The relayed session still answers, and still registers.
        assert (await phone.command("NOOP")).ok
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        await phone.logout()


# Dovecot 2.4 offers COMPRESS=DEFLATE by default; 2.3 with imap_zlib.
COMPRESS_CONF = {"2.3": "protocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n", "2.4": ""}


async def test_compress_is_dovecots_own_and_the_relay_steps_out(test_pki, dovecot_version):
    message = big_message(2 * 1024 * 1024)
    conf = COMPRESS_CONF[dovecot_version]
    async with run_stack(test_pki, version=dovecot_version, dovecot_conf=conf) as stack:
        phone = await stack.iphone()
        assert "COMPRESS=DEFLATE" in await phone.capability()
        reply = await phone.compress()
        assert reply.tagged.startswith(b"%s OK Begin compression" % reply.tag.encode())
        # The relay no longer reads the session: Dovecot itself answers this.
        refused = await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
        assert refused.status == "BAD" and b"Unknown command" in refused.tagged
        assert await devices(stack) == []
        assert (await phone.append("INBOX", message)).ok
        assert (await phone.command("SELECT INBOX")).ok
        fetch = await phone.command("FETCH 1 BODY.PEEK[]")
        assert fetch.untagged[0].endswith(b"{%d}\r\n" % len(message) + message + b")")
        assert phone.stream.sent_compressed < len(message) / 10
        await phone.send_raw(b"i1 IDLE\r\n")
        assert (await phone.read_response()).startswith(b"+ ")
        deliver(stack.dovecot, "alice", b"Subject: compressed\r\n\r\nhi\r\n")
        assert await phone.read_response() == b"* 2 EXISTS"
        await phone.send_raw(b"DONE\r\n")
        assert (await phone.read_until_tagged("i1")).ok
        await phone.logout()


async def test_a_refused_literal_does_not_hide_the_next_command(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        refused = await phone.append("NoSuchBox", b"Subject: x\r\n\r\n0123")
        assert refused.tagged.startswith(b"%s NO [TRYCREATE]" % refused.tag.encode())
        # The 20 bytes the client never sent are not awaited: this is a command.
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        assert [d.device_token for d in await devices(stack)] == [TOKEN]
        await phone.logout()


def capabilities_in(line: bytes) -> list[bytes]:
    """The capability names of a `* CAPABILITY` line or an `OK [CAPABILITY ...]` one."""
    match = re.search(rb"^\* CAPABILITY (.*)$|\[CAPABILITY ([^\]]*)\]", line)
    assert match, line
    return (match[1] or match[2]).split()


async def test_xapplepushservice_is_offered_exactly_where_the_relay_answers_it(
    test_pki, dovecot_version
):
    async with alice_relayed_bob_not(test_pki, dovecot_version) as stack:
        for user, offered in (("alice", 1), ("bob", 0)):
            client = await ImapClient.connect(
                stack.dovecot.host,
                stack.dovecot.imaps_port,
                ssl_context=stack.dovecot.client_ssl_context(),
            )
            # Not before login...
            assert b"XAPPLEPUSHSERVICE" not in client.greeting
            # ...and after it, once, in both forms, to relayed users only.
            login = await client.login(user, "secret")
            assert capabilities_in(login.tagged).count(b"XAPPLEPUSHSERVICE") == offered
            (line,) = (await client.command("CAPABILITY")).untagged_starting(b"CAPABILITY")
            assert capabilities_in(line).count(b"XAPPLEPUSHSERVICE") == offered
            if offered:
                assert (await client.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
                # Registered: the relay has stepped out, and says so no more.
                (line,) = (await client.command("CAPABILITY")).untagged_starting(b"CAPABILITY")
                assert b"XAPPLEPUSHSERVICE" not in capabilities_in(line)
            await client.logout()


TIMINGS = re.compile(rb" \(\d+\.\d+ \+ \d+\.\d+(?: \+ \d+\.\d+)? secs\)")
UIDVALIDITY = re.compile(rb"\b1\d{9}\b")


async def transcript(stack: Stack, user: str, register: bool) -> list[bytes]:
    """Every line Dovecot (through the relay, or not) sends `user` for one script that
    touches what the relay looks at: a refused and an accepted synchronizing literal,
    pipelining, IDLE (where the relay steps out), then large literals and LOGOUT. Only
    the timings and UIDVALIDITY (which differ from run to run) are blanked."""
    client = await stack.iphone(user)
    if register:
        await client.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
    lines: list[bytes] = []

    async def run(data: bytes, until: bytes) -> None:
        """Send `data`, then read up to a line that matches `until`."""
        await client.send_raw(data)
        while not re.match(until, line := await client.read_response()):
            lines.append(line)
        lines.append(line)

    small = b"Subject: small\r\n\r\n" + b"x1 XAPPLEPUSHSERVICE\r\n" * 20_000
    large = big_message(3 * 1024 * 1024)
    until_idle = [
        (b"s1 SELECT INBOX\r\n", b"s1 "),
        (b"a1 APPEND NoSuchBox {20}\r\n", b"a1 "),
        (b"a2 APPEND INBOX {%d}\r\n" % len(small), rb"\+"),
        (small + b"\r\n", b"a2 "),
        (b"p1 NOOP\r\np2 STATUS INBOX (MESSAGES)\r\np3 FETCH 1 BODY.PEEK[]\r\n", b"p3 "),
        (b"i1 IDLE\r\n", rb"\+"),
    ]
    after_idle = [
        (b"DONE\r\n", b"i1 "),
        (b"a3 APPEND INBOX {%d}\r\n" % len(large), rb"\+"),
        (large + b"\r\n", b"a3 "),
        (b"f1 FETCH 1:* (FLAGS BODY.PEEK[])\r\n", b"f1 "),
        (b"a4 APPEND NoSuchBox {20}\r\n", b"a4 "),
        (b"l1 LOGOUT\r\n", b"l1 "),
    ]
    for data, until in until_idle:
        await run(data, until)
    other = await stack.iphone(user)
    assert (await other.append("INBOX", b"Subject: while idle\r\n\r\nhi\r\n")).ok
    await other.logout()
    await run(b"", rb"\* \d+ EXISTS")
    for data, until in after_idle:
        await run(data, until)
    with pytest.raises(EOFError):
        await client.read_response()
    await client.aclose()
    return [UIDVALIDITY.sub(b"UIDVALIDITY", TIMINGS.sub(b"", line)) for line in lines]


async def test_relayed_sessions_are_byte_for_byte_what_dovecot_sends(test_pki, dovecot_version):
    async with alice_relayed_bob_not(test_pki, dovecot_version) as stack:
        # alice is relayed (scanned to IDLE; then stepped out from the start by
        # registering), bob is not: the same script, the same answers.
        for register in (False, True):
            relayed = await transcript(stack, "alice", register)
            direct = await transcript(stack, "bob", register)
            assert relayed == direct
        assert [d.username for d in await devices(stack)] == ["alice"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def bomb(size: int) -> bytes:
    """A raw deflate stream of a NOOP line with `size` NUL bytes: about 1000x smaller."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(1024 * 1024)
    parts = [compressor.compress(b"a NOOP ")]
    parts += [compressor.compress(block) for _ in range(size // len(block))]
    return b"".join(parts) + compressor.flush(zlib.Z_SYNC_FLUSH)


def pass_through(pair: tuple[socket.socket, socket.socket], data: bytes, answer: bytes) -> bytes:
    """Send `data` at the client's end; return what arrives at Dovecot's end once `answer`
    (sent from Dovecot's end when it has all) reached the client."""
    client, server = pair
    received = bytearray()
    server.settimeout(10)
    with ThreadPoolExecutor(1) as sender:
        sent = sender.submit(client.sendall, data)
        while len(received) < len(data) and (chunk := server.recv(1 << 20)):
            received += chunk
        sent.result()
    server.sendall(answer)
    client.settimeout(5)
    assert client.recv(len(answer)) == answer
    return bytes(received)


async def test_memory_stays_bounded_whatever_the_client_sends(test_pki):
    async with run_stack(test_pki, version=None) as stack:
        pid = stack.service.process.pid
        relay_socket = stack.settings["relay_socket"]

        def attack() -> int:
            with contextlib.ExitStack() as ends:
                sessions = [hand_over(relay_socket) for _ in range(4)]
                for pair in sessions:
                    ends.enter_context(pair[0])
                    ends.enter_context(pair[1])
                warm, compressed, line, literal = sessions
                assert relays(warm)
                before = rss(pid)
                # A COMPRESS stream that inflates 1000x: 400 KB sent, 400 MB inside.
                assert pass_through(compressed, b"c COMPRESS DEFLATE\r\n", b"c OK Begin.\r\n")
                payload = bomb(400 * 1024 * 1024)
                assert len(payload) < 500 * 1024
                assert pass_through(compressed, payload, b"x\r\n") == payload
                # A 32 MB line, and a 32 MB literal, before any registration.
                data = b"l1 NOOP " + b"x" * (32 * 1024 * 1024)
                assert pass_through(line, data, b"x\r\n") == data
                head = b"a1 APPEND INBOX {%d}\r\n" % (32 * 1024 * 1024)
                assert pass_through(literal, head, b"+ OK\r\n") == head
                data = b"y" * (32 * 1024 * 1024)
                assert pass_through(literal, data, b"a1 OK\r\n") == data
                return rss(pid) - before

        grown = await trio.to_thread.run_sync(attack)
        # Before the relay stepped out of COMPRESS this grew by about 186 MB.
        assert grown < 8 * 1024 * 1024, grown


async def test_only_allowed_users_may_hand_connections_to_the_relay(test_pki, dovecot_version):
    """The helper asserts who logged in, so the relay takes handoffs only from its peers."""
    async with run_stack(test_pki, version=dovecot_version) as stack:
        helper = stack.root / "dovecot-files" / "postlogin.py"
        socket_path = stack.settings["relay_socket"]
        # As nobody (not in relay_peers): refused, and the helper goes on without it.
        result = await trio.run_process(
            [SYSTEM_PYTHON, "-I", str(helper), "--socket", socket_path, "/bin/echo", "went on"],
            user="nobody",
            capture_stdout=True,
            capture_stderr=True,
        )
        assert result.stdout == b"went on\n"
        assert b"unavailable" in result.stderr
        await stack.service.wait_for_log("refused a relay handoff from uid 65534")


async def test_relay_only_field_leaves_other_users_to_dovecot(test_pki, dovecot_version):
    async with alice_relayed_bob_not(test_pki, dovecot_version) as stack:
        alice = await stack.iphone("alice")
        assert (await alice.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        bob = await stack.iphone("bob")
        # Not relayed: Dovecot itself answers, and knows no such command.
        refused = await bob.xapplepushservice(ACCOUNT, OTHER_TOKEN, ["INBOX"])
        assert refused.status == "BAD" and b"Unknown command" in refused.tagged
        assert (await bob.command("NOOP")).ok
        assert [d.username for d in await devices(stack)] == ["alice"]
        await alice.logout()
        await bob.logout()
        assert "dovenotify-postlogin" not in stack.dovecot.log_text()


async def test_out_of_descriptors_the_relay_pauses_and_sessions_go_on(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone()
        held = hand_over(stack.settings["relay_socket"])
        pid = stack.service.process.pid
        # No room for one more descriptor.
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), hard))
        # A login now waits out relay_timeout and goes on without the relay.
        bob = await stack.iphone("bob")
        assert (await bob.xapplepushservice(ACCOUNT, OTHER_TOKEN, ["INBOX"])).status == "BAD"
        await stack.service.wait_for_log("cannot take more relayed sessions (Too many open files")
        # Sessions relayed before go on, registrations included.
        assert relays(held)
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        await bob.logout()
        # Room again: the next login is relayed.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        bob = await stack.iphone("bob")
        assert (await bob.xapplepushservice(ACCOUNT, OTHER_TOKEN, ["INBOX"])).ok
        await stack.service.wait_for_log("taking relayed sessions again")
        await bob.logout()
        await phone.logout()
        for end in held:
            end.close()
        assert "Traceback" not in stack.service.log_text()
