"""Attacks on a running dovenotify by a local account and by hostile IMAP clients.

Each runs against real Dovecot 2.3 and 2.4 with the service's defaults: the local
account ("mallory", made here with adduser and removed after) is no mail user;
its processes run with its uid and gid. Each test asserts what the attack may not
do (push someone, read something, grow the service, stop it) and what the admin
reads about it. Figures (RSS growth, push delay) are printed for the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from dovenotify.admin.httpserver import Request, Response, open_listeners, serve_http
from dovenotify.events import spool
from tests.harness.dovecot import deliver, free_ports, make_root
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "ab" * 32
MESSAGE = b"Subject: hello\r\n\r\nhi\r\n"
# Unique per run: two runs at once must not share (and delete) one account.
MALLORY = f"dnmallory{os.getpid()}"
PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def mallory() -> Iterator[pwd.struct_passwd]:
    """An ordinary local account, as `adduser` makes one; removed afterwards."""
    with contextlib.suppress(KeyError):
        pwd.getpwnam(MALLORY)
        subprocess.run(["deluser", "--quiet", MALLORY], check=True, capture_output=True)
    subprocess.run(
        ["adduser", "--quiet", "--disabled-password", "--gecos", "", "--no-create-home",
         "--home", "/nonexistent", MALLORY],
        check=True,
    )  # fmt: skip
    try:
        yield pwd.getpwnam(MALLORY)
    finally:
        subprocess.run(["deluser", "--quiet", MALLORY], check=True, capture_output=True)


def as_user(user: pwd.struct_passwd, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as `user` (its uid, gid and no other group)."""
    return subprocess.run(
        [PYTHON, "-I", "-c", textwrap.dedent(code)],
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def as_mallory(user: pwd.struct_passwd, code: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(as_user, user, code)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def service_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(FileNotFoundError):  # closed while listed
            count += os.readlink(fd).startswith("socket:")
    return count


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split()[1]
    raise AssertionError(f"no {name}")


async def send_as(user: pwd.struct_passwd, path: str, data: bytes) -> str:
    """Connect to the unix socket `path` as `user`, send `data`; what came back."""
    done = await as_mallory(
        user,
        f"""
        import socket
        with socket.socket(socket.AF_UNIX) as s:
            s.connect({path!r})
            try:
                s.sendall({data!r})
                print(s.recv(16))
            except (BrokenPipeError, ConnectionResetError):
                print(b"")  # hung up on before or after the data
        """,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def register(stack: Stack, user: str = "alice", token: str = TOKEN) -> None:
    phone = await stack.iphone(user)
    assert (await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])).ok
    await phone.logout()


def assert_no_traceback(stack: Stack) -> None:
    log = stack.service.log_text()
    assert "Traceback" not in log and "PRIVATE KEY" not in log, log


async def test_a_local_account_can_push_nobody_else(test_pki, dovecot_version, mallory):
    settings = {"event_line_max": 1024}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        await register(stack)
        lines = b"MessageNew\talice\tINBOX\tlmtp\nMessageNew\tALICE\tINBOX\timap\n"
        lines += b"MessageNew\t" + b"x" * 2000 + b"\tINBOX\tlmtp\n"
        await send_as(mallory, stack.settings["event_socket"], lines)
        await stack.service.wait_for_log("refused 2 event(s) from pid")
        assert f"(uid {mallory.pw_uid} ({MALLORY})" in stack.service.log_text()
        assert "line longer than 1024 bytes" in stack.service.log_text()
        assert stack.standin.requests == []
        # Dovecot's own events (the mail uid) still push.
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
        assert (await stack.standin.next_request()).path.endswith(TOKEN)
        # Her first event made her a spool file: what she appends there is hers too.
        own = Path(stack.settings["event_spool"]) / str(mallory.pw_uid)
        assert spool.appendable(own, mallory.pw_uid)
        appended = await as_mallory(
            mallory,
            f"""
            with open({str(own)!r}, "ab") as f:
                f.write(b"MessageNew\\talice\\tINBOX\\tlmtp\\n")
            """,
        )
        assert appended.returncode == 0, appended.stderr
        # Read within milliseconds, refused (logged with the life of her file, or
        # not within the minute of her last refusal): nobody is pushed.
        with trio.move_on_after(0.5):
            request = await stack.standin.next_request()
            raise AssertionError(f"mallory's line pushed {request.path}")
        assert len(stack.standin.requests) == 1
        assert_no_traceback(stack)


async def test_a_local_account_cannot_read_or_touch_registrations_or_the_spool(
    test_pki, dovecot_version, mallory
):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        pid = stack.service.process.pid
        assert status_field(pid, "Umask") == "0077"
        spool = Path(stack.settings["event_spool"])
        # The service is away: the Lua driver (the mail uid) appends a delivery to
        # the file the service made it.
        assert await stack.service.stop() == 0
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
        kept = spool / str(pwd.getpwnam("nobody").pw_uid)
        assert kept.stat().st_size > 0
        assert (kept.stat().st_uid, kept.stat().st_mode & 0o777) == (os.geteuid(), 0o620)
        database = stack.settings["database"]
        tried = await as_mallory(
            mallory,
            f"""
            import glob, os
            targets = {{"db": {database!r}, "spool": {str(kept)!r}}}
            for f in glob.glob({database!r} + "-*"):
                targets[os.path.basename(f)] = f
            for name, path in targets.items():
                for mode in ("rb", "ab", "wb"):
                    try:
                        open(path, mode).close()
                        print("OPENED", name, mode)
                    except PermissionError:
                        pass
            for attempt in (
                lambda: os.listdir({str(spool)!r}),
                lambda: os.unlink({str(kept)!r}),
                lambda: open(os.path.join({str(spool)!r}, str(os.getuid())), "ab").close(),
            ):
                try:
                    attempt()
                    print("DID", attempt)
                except PermissionError:
                    pass
            """,
        )
        assert tried.returncode == 0, tried.stderr
        assert tried.stdout == ""
        # A database an older dovenotify left 0644 is made private at the next start.
        Path(database).chmod(0o644)
        async with contextlib.AsyncExitStack() as later:
            from tests.harness.service import run_service

            service = await later.enter_async_context(
                run_service(stack.root / "service", stack.settings)
            )
            # Alice's missed delivery is pushed once.
            assert (await stack.standin.next_request()).path.endswith(TOKEN)
            await service.wait_for_log("1 event line(s) from the spool of uid")
            with trio.move_on_after(0.5):
                await stack.standin.next_request()
            assert len(stack.standin.requests) == 1
            assert Path(database).stat().st_mode & 0o777 == 0o600
            assert "Traceback" not in service.log_text()


def test_in_the_spool_a_local_account_may_append_to_its_own_file_and_nothing_else(mallory):
    """No file, link or FIFO of hers where a mail process writes; no other's events."""
    root = make_root("dovenotify-spool-")
    try:
        path = root / "events.spool"
        assert spool.create(path) is None
        own, mail = spool.provide(path, mallory.pw_uid), spool.provide(path, 4241)
        result = as_user(
            mallory,
            f"""
            import os
            path = {str(path)!r}
            def attempt(name, action):
                try:
                    action()
                    print(name, "done")
                except OSError as e:
                    print(name, e.strerror)
            def append(name):
                with open(os.path.join(path, name), "ab") as f:
                    f.write(b"MessageNew\\tmallory\\tINBOX\\tlmtp\\n")
            attempt("append to her own", lambda: append({own.name!r}))
            attempt("read her own", lambda: open(os.path.join(path, {own.name!r}), "rb").close())
            attempt("append to the mail uid's", lambda: append({mail.name!r}))
            attempt("make a file", lambda: append("4242"))
            attempt("make a link", lambda: os.symlink("/etc/passwd", os.path.join(path, "4243")))
            attempt("make a FIFO", lambda: os.mkfifo(os.path.join(path, "4244")))
            attempt("list", lambda: os.listdir(path))
            attempt("rename hers", lambda: os.rename(
                os.path.join(path, {own.name!r}), os.path.join(path, "4245")))
            """,
        )
        assert result.stdout.splitlines() == [
            "append to her own done",
            "read her own Permission denied",
            "append to the mail uid's Permission denied",
            "make a file Permission denied",
            "make a link Permission denied",
            "make a FIFO Permission denied",
            "list Permission denied",
            "rename hers Permission denied",
        ], result.stderr
        assert own.read_bytes() == b"MessageNew\tmallory\tINBOX\tlmtp\n"
        assert mail.read_bytes() == b""
        assert sorted(os.listdir(path)) == sorted([own.name, mail.name])
    finally:
        shutil.rmtree(root)


async def test_a_full_spool_file_stops_growing_and_pushes_everyone(test_pki, dovecot_version):
    """The driver stops at event_spool_size; the service then pushes every device."""
    settings = {"event_spool_size": 4096}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        await register(stack, "alice", TOKEN)
        await register(stack, "bob", "cd" * 32)
        assert await stack.service.stop() == 0
        spool = Path(stack.settings["event_spool"])

        def deliveries() -> None:
            # 28 bytes a line: 147 deliveries fill 4096 bytes.
            for _ in range(160):
                deliver(stack.dovecot, "alice", MESSAGE)

        await trio.to_thread.run_sync(deliveries)
        kept = spool / str(pwd.getpwnam("nobody").pw_uid)
        assert kept.stat().st_size < 4096 + 64  # the cap, and the one SpoolFull line
        assert kept.read_bytes().endswith(b"SpoolFull\talice\t\tlmtp\n")
        await trio.to_thread.run_sync(
            stack.dovecot.wait_for_log,
            r"dovenotify: 1 event\(s\) not sent: cannot append to \S+ \(it is full",
        )
        from tests.harness.service import run_service

        async with run_service(stack.root / "service", stack.settings) as service:
            await service.wait_for_log("was full or not its own: pushing 2 device(s)")
            tokens = {(await stack.standin.next_request()).path[-64:] for _ in range(2)}
        assert tokens == {TOKEN, "cd" * 32}


async def test_an_oversized_spool_file_is_read_no_further_than_its_bound(
    test_pki, dovecot_version, mallory
):
    """42 MB of distinct lines written into its own spool file by a local account."""
    async with run_stack(test_pki, version=dovecot_version) as stack:
        # Her first event on the socket makes her a spool file.
        await send_as(mallory, stack.settings["event_socket"], b"")
        own = Path(stack.settings["event_spool"]) / str(mallory.pw_uid)
        with trio.fail_after(5):
            while not own.exists():
                await trio.sleep(0.01)
        assert await stack.service.stop() == 0
        done = await as_mallory(
            mallory,
            f"""
            with open({str(own)!r}, "ab") as f:
                for chunk in range(1000):
                    f.write(b"".join(
                        b"MessageNew\\t{MALLORY}\\tfolder-%d-%d\\tlmtp\\n" % (chunk, n)
                        for n in range(1200)
                    ))
                    if f.tell() > 42_000_000:
                        break
            """,
        )
        assert done.returncode == 0, done.stderr
        from tests.harness.service import run_service

        async with run_service(stack.root / "service", stack.settings) as service:
            before = rss_kib(service.process.pid)
            await service.wait_for_log("is bigger than event_spool_size", timeout=60)
            grown = rss_kib(service.process.pid) - before
            print(f"\n42 MB spool file: service RSS {before} KiB, grew {grown} KiB")
            assert grown < 30_000, grown
            # Set aside, read as far as its bound and removed; she has a fresh one.
            with trio.fail_after(5):
                while own.with_name(own.name + ".draining").exists():
                    await trio.sleep(0.01)
            assert own.stat().st_size == 0
            assert "Traceback" not in service.log_text()


async def test_a_flood_of_lines_is_cut_short_in_bounded_memory(test_pki, dovecot_version, mallory):
    """63 MB of distinct lines on one connection, as mallory and as the mail uid."""
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        pid, path = stack.service.process.pid, stack.settings["event_socket"]
        before = rss_kib(pid)
        flood = f"""
            import socket, time
            start = time.monotonic()
            sent = 0
            with socket.socket(socket.AF_UNIX) as s:
                s.connect({path!r})
                try:
                    for chunk in range(1000):
                        lines = b"".join(
                            b"MessageNew\\t%s\\tfolder-%d-%d\\tlmtp\\n" % (USER, chunk, n)
                            for n in range(1600)
                        )
                        s.sendall(lines)
                        sent += len(lines)
                        if sent > 63_000_000:
                            break
                except (BrokenPipeError, ConnectionResetError):
                    pass
            print(sent, time.monotonic() - start)
            """
        sent = {}
        for who, user in (("mallory", MALLORY), ("mail uid", "alice")):
            code = flood.replace("USER", repr(user.encode()))
            if who == "mallory":
                done = await as_mallory(mallory, code)
            else:
                nobody = pwd.getpwnam("nobody")
                done = await trio.to_thread.run_sync(as_user, nobody, code)
            assert done.returncode == 0, done.stderr
            sent[who] = int(done.stdout.split()[0])
        with trio.fail_after(10):
            while stack.service.log_text().count("closed an event connection from") < 2:
                await trio.sleep(0.05)
        grown = rss_kib(pid) - before
        print(f"\nline floods: sent {sent} bytes; service RSS {before} KiB, grew {grown} KiB")
        assert grown < 30_000, grown
        log = stack.service.log_text()
        # Cut at 10,000 lines, or at 2 s when handling them took that long.
        assert log.count("closed an event connection from") == 2, log
        assert stack.service.process.returncode is None
        # Still serving: a delivery pushes.
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
        assert (await stack.standin.next_request()).path.endswith(TOKEN)
        assert_no_traceback(stack)


async def test_idle_connections_delay_no_push(test_pki, dovecot_version, mallory):
    """700 idle connections from a local account; then a delivery pushes at once."""
    async with run_stack(test_pki, version=dovecot_version) as stack:
        await register(stack)
        path = stack.settings["event_socket"]
        # A first push opens the connection to APNs, kept from then on.
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
        await stack.standin.next_request()
        sockets_before = service_sockets(stack.service.process.pid)
        holder = await trio.lowlevel.open_process(
            [PYTHON, "-I", "-c", textwrap.dedent(f"""
                import resource, socket, sys
                resource.setrlimit(resource.RLIMIT_NOFILE, (2048, 2048))
                held = []
                for _ in range(700):
                    s = socket.socket(socket.AF_UNIX)
                    s.connect({path!r})
                    held.append(s)
                print("held", flush=True)
                sys.stdin.read()
                """)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            user=mallory.pw_uid,
            group=mallory.pw_gid,
            extra_groups=[],
        )  # fmt: skip
        try:
            with trio.fail_after(20):
                assert await holder.stdout.receive_some(16) == b"held\n"
            start = time.monotonic()
            await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)
            await stack.standin.next_request()
            delay = time.monotonic() - start
            # The 8 it may hold are closed after event_connection_seconds, the
            # others at once: the service holds none of the 700 any more.
            with trio.fail_after(5):
                while service_sockets(stack.service.process.pid) > sockets_before:
                    await trio.sleep(0.05)
        finally:
            await holder.stdin.aclose()
            await holder.wait()
            await holder.stdout.aclose()
        print(f"\n700 idle connections held: delivery to push {delay * 1000:.0f} ms")
        assert delay < 1.0
        log = stack.service.log_text()
        assert log.count("all event_connections_per_uid allows") == 1, log
        assert_no_traceback(stack)


async def test_out_of_descriptors_pauses_the_listeners(test_pki, dovecot_version):
    (metrics_port,) = free_ports(1)
    settings = {"metrics_listen": f"127.0.0.1:{metrics_port}"}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        await register(stack)
        pid, path = stack.service.process.pid, stack.settings["event_socket"]
        limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        open_now = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now + 2, limits[1]))
        with contextlib.ExitStack() as held:
            for _ in range(10):
                s = held.enter_context(socket.socket(socket.AF_UNIX))
                s.connect(path)
                s.sendall(b"MessageNew\talice\tINBOX\tlmtp\n")
                s.shutdown(socket.SHUT_WR)
            for _ in range(5):
                s = held.enter_context(socket.socket())
                s.connect(("127.0.0.1", metrics_port))
            await stack.service.wait_for_log("cannot accept event connections")
            await stack.service.wait_for_log("cannot accept HTTP connections")
            await trio.sleep(0.5)  # many retries' worth, each of which could log
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)
        assert (await stack.standin.next_request()).path.endswith(TOKEN)
        log = stack.service.log_text()
        assert log.count("cannot accept event connections") == 1, log
        assert stack.service.process.returncode is None
        assert_no_traceback(stack)


async def test_a_hostile_imap_client_is_bounded(test_pki, dovecot_version):
    settings = {"registrations_per_user": 3, "mailboxes_per_registration": 2}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        phone = await stack.iphone("alice")
        for token in ("a", "abc", "ab" * 101, "zz" * 32):
            reply = await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])
            assert reply.status == "BAD", (token, reply)
        await phone.logout()
        # One registration per session, as iOS does: the relay steps out after it.
        for n in range(1, 5):
            phone = await stack.iphone("alice")
            assert (await phone.xapplepushservice(f"A-{n}", f"{n:02x}" * 32, ["INBOX"])).ok
            await phone.logout()
        # A mailbox name with a terminal escape (ESC in modified UTF-7, as raw
        # control characters are refused), and an extra key naming bob.
        phone = await stack.iphone("alice")
        reply = await phone.command(
            'XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "A-0"'
            f' "aps-device-token" "{"0a" * 32}" "aps-subtopic" "com.apple.mobilemail"'
            ' "username" "bob" "mailboxes" ("INBOX" "Evil&ABs-[2J" "Third")'
        )
        assert reply.ok, reply
        # Only the mailboxes kept are confirmed: iOS logs the third as not pushed.
        assert [line for line in reply.untagged if b'"mailbox"' in line] == [
            b'* XAPPLEPUSHSERVICE "mailbox" "INBOX"',
            b'* XAPPLEPUSHSERVICE "mailbox" "Evil&ABs-[2J"',
        ]
        await phone.logout()
        listed = subprocess.run(
            [*_dovenotify(), "devices", "--config", str(stack.service.config_path), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        devices = json.loads(listed.stdout)
        assert {d["username"] for d in devices} == {"alice"}
        assert sorted(d["account_id"] for d in devices) == ["A-0", "A-3", "A-4"]
        (evil,) = [d for d in devices if d["account_id"] == "A-0"]
        assert evil["mailboxes"] == ["INBOX", "Evil\x1b[2J"]
        table = subprocess.run(
            [*_dovenotify(), "devices", "--config", str(stack.service.config_path)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "\x1b" not in table.stdout and "Evil\\x1b[2J" in table.stdout
        await stack.service.wait_for_log("removed the 1 oldest")
        log = stack.service.log_text()
        assert "\x1b" not in log and "Evil\\x1b[2J" in log
        assert "only the first 2 are pushed" in log
        assert_no_traceback(stack)


async def test_the_xapsd_api_answers_only_the_mail_processes(test_pki, dovecot_version, mallory):
    (port,) = free_ports(1)
    settings = {"compat_listen": f"127.0.0.1:{port}"}
    async with run_stack(test_pki, settings, version=dovecot_version) as stack:
        await register(stack)
        client = f"""
            import http.client, json
            def post(path, body):
                c = http.client.HTTPConnection("127.0.0.1", {port}, timeout=10)
                c.request("POST", path, json.dumps(body))
                r = c.getresponse()
                print(path, body.get("Username"), r.status)
                c.close()
            token = "{TOKEN}"
            post("/register", {{"ApsAccountId": "X", "ApsDeviceToken": token,
                "ApsSubtopic": "com.apple.mobilemail", "Username": "alice",
                "Mailboxes": ["INBOX"]}})
            post("/notify", {{"Username": "alice", "Mailbox": "INBOX", "Events": ["MessageNew"]}})
            post("/notify", {{"Username": "{MALLORY}", "Mailbox": "INBOX"}})
            """
        done = await as_mallory(mallory, client)
        assert done.stdout.split("\n")[:3] == [
            "/register alice 403",
            "/notify alice 403",
            f"/notify {MALLORY} 404",
        ], done
        # The mail uid may ask for anyone, but not with a forged log line or a
        # 60,000-digit token.
        nobody = pwd.getpwnam("nobody")
        hostile = client.replace('"X"', '"X\\nforged: line"')
        hostile += 'post("/register", {"ApsAccountId": "Y", "ApsDeviceToken": "ab" * 30000,'
        hostile += (
            ' "ApsSubtopic": "com.apple.mobilemail", "Username": "alice", "Mailboxes": ["INBOX"]})'
        )
        done = await trio.to_thread.run_sync(as_user, nobody, textwrap.dedent(hostile))
        assert done.stdout.split("\n")[:4] == [
            "/register alice 400",
            "/notify alice 200",
            f"/notify {MALLORY} 404",
            "/register alice 400",
        ], done
        assert (await stack.standin.next_request()).path.endswith(TOKEN)
        log = stack.service.log_text()
        assert "\nforged: line" not in log
        assert_no_traceback(stack)


async def test_relay_handoff_from_a_local_account_is_refused(test_pki, dovecot_version, mallory):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        hello = b'{"user": "alice", "ip": "127.0.0.1"}\n'
        assert await send_as(mallory, stack.settings["relay_socket"], hello) == "b''"
        await stack.service.wait_for_log(f"refused a relay handoff from uid {mallory.pw_uid}")


def test_no_traceback_reaches_the_admin(tmp_path):
    config = tmp_path / "dovenotify.yaml"
    (tmp_path / "files").write_text("a file, not a directory")
    config.write_text(f"dovecot_files: {tmp_path / 'files'}\n")
    done = subprocess.run(
        [*_dovenotify(), "dovecot-config", "--install", "--dovecot-version", "2.3",
         "--config", str(config)],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "files" in done.stderr, done.stderr


def _dovenotify() -> list[str]:
    from tests.harness.service import dovenotify_command

    return dovenotify_command()


async def test_http_connections_past_the_bound_wait(nursery):
    """http_connections: idle connections hold their places; the next one waits."""
    listeners = await open_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]

    async def answer(request: Request) -> Response:
        return Response(200, b"ok")

    nursery.start_soon(serve_http, listeners, answer, 2)
    with contextlib.ExitStack() as held:
        for _ in range(2):
            held.enter_context(socket.create_connection(("127.0.0.1", port)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.move_on_after(0.5) as waited:
                await http.get("/")
            assert waited.cancelled_caught
            held.close()  # an idle connection goes: the next request is served
            with trio.fail_after(5):
                assert (await http.get("/")).text == "ok"
    nursery.cancel_scope.cancel()
