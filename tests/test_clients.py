"""Real IMAP clients through the relay: Debian's mbsync (isync) and offlineimap3.

Each test runs one client against two Dovecots of the same version and settings,
one behind dovenotify (every session through the post-login helper and the relay),
one plain, seeded with the same mailbox: a few hundred messages, some of them
MB-sized with 8-bit binary bodies. The client syncs down, then up (new local
messages, changed flags, a deletion), then again many times incrementally; every
run must succeed, and the local trees and the servers' maildirs must come out the
same both ways. COMPRESS=DEFLATE is tested offered and not offered (2.4 offers it
by default; 2.3 with imap_zlib loaded). The clients are the host's: a client
needs no Dovecot beside it, so the chroot with the other version does not hold them.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from tests.harness.dovecot import Dovecot, StartDovecot, make_root, put_message
from tests.harness.imap_client import ImapClient
from tests.harness.stack import run_stack

SMALL_MESSAGES = 290
LARGE_SIZES = (1_100_000, 2_300_000, 1_600_000)
INCREMENTAL_RUNS = 20
CLIENT_TIMEOUT = 120

# What a Dovecot version needs to offer COMPRESS=DEFLATE, or not to.
COMPRESS_CONF = {
    ("2.3", True): "protocol imap {\n  mail_plugins = $mail_plugins imap_zlib\n}\n",
    ("2.3", False): "",
    ("2.4", True): "",
    ("2.4", False): 'protocol imap {\n  imap_capability {\n    "COMPRESS=DEFLATE" = no\n  }\n}\n',
}

# --- the mailbox --------------------------------------------------------------


def small_message(n: int) -> bytes:
    rng = random.Random(n)
    words = " ".join(rng.choice(("push", "mail", "relay", "dovecot", "imap")) for _ in range(40))
    body = "\r\n".join(words[i : i + 70] for i in range(0, len(words), 70))
    return (
        f"From: sender{n}@example.org\r\nTo: alice@example.org\r\n"
        f"Subject: message {n}\r\nMessage-ID: <{n}@seed.example.org>\r\n"
        f"Date: Sun, 06 Dec 2026 00:{n % 60:02d}:00 +0000\r\n\r\n{body}\r\n"
    ).encode()


def binary_message(n: int, size: int) -> bytes:
    """An 8-bit message of `size` bytes: random octets in CRLF lines, no NUL."""
    head = (
        f"From: big{n}@example.org\r\nTo: alice@example.org\r\nSubject: binary {n}\r\n"
        f"Message-ID: <big{n}@seed.example.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    raw = random.Random(size).randbytes(size)
    octets = raw.translate(bytes.maketrans(b"\0\r\n", b"\x01\x02\x03"))
    lines = [octets[i : i + 76] for i in range(0, size - len(head), 78)]
    return (head + b"\r\n".join(lines) + b"\r\n")[:size]


def seed_messages() -> list[bytes]:
    messages = [small_message(n) for n in range(SMALL_MESSAGES)]
    messages += [binary_message(n, size) for n, size in enumerate(LARGE_SIZES)]
    return messages


def seed_flags(n: int) -> str:
    return "".join(flag for flag, every in (("F", 7), ("R", 11), ("S", 2)) if n % every == 0)


def seed(d: Dovecot) -> None:
    for n, message in enumerate(seed_messages()):
        put_message(d, "alice", message, f"1700000000.seed{n}.test", seed_flags(n))


# --- what the clients and servers end up with ---------------------------------


_TUID = re.compile(rb"^X-TUID: [^\n]*\n", re.MULTILINE)


def file_digest(path: Path) -> str:
    return digest(_TUID.sub(b"", path.read_bytes(), count=1))


def messages_in(tree: Path) -> Counter[tuple[str, str, str]]:
    """(folder, content hash, flags) of every message in the maildirs under `tree`.

    File names differ between any two runs (times, PIDs, UIDs), a client may store
    lines with LF where the server has CRLF, and mbsync adds a random X-TUID header
    to what it stores (to find it again if its state is lost): none is a difference.
    """
    found: Counter[tuple[str, str, str]] = Counter()
    for path in tree.rglob("*"):
        if path.parent.name in ("cur", "new") and path.is_file():
            folder = str(path.parent.parent.relative_to(tree))
            flags = path.name.rpartition(":2,")[2] if ":2," in path.name else ""
            found[folder, file_digest(path), "".join(sorted(flags))] += 1
    return found


def contents(state: Counter[tuple[str, str, str]]) -> Counter[str]:
    return Counter(digest for (_, digest, _), count in state.items() for _ in range(count))


def digest(message: bytes) -> str:
    return hashlib.sha256(message.replace(b"\r\n", b"\n")).hexdigest()


def server_state(d: Dovecot) -> Counter[tuple[str, str, str]]:
    return messages_in(d.layout.homes / "alice" / "Maildir")


# --- the clients ----------------------------------------------------------------


def server_fingerprint(d: Dovecot) -> str:
    """SHA-512 of the server's certificate, as offlineimap's cert_fingerprint wants it."""
    pem = d.layout.cert.read_text()
    first = pem[: pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return hashlib.sha512(ssl.PEM_cert_to_DER_cert(first)).hexdigest()


@attrs.define
class Client:
    """One IMAP client program with its own configuration and local maildir tree."""

    kind: str  # "mbsync" or "offlineimap"
    home: Path
    dovecot: Dovecot
    compress: bool
    runs: int = 0

    @property
    def local(self) -> Path:
        return self.home / "mail"

    def write_config(self) -> Path:
        d = self.dovecot
        ca = self.home / "ca.pem"
        d.ca.cert_pem.write_to_path(str(ca))
        self.local.mkdir()
        if self.kind == "mbsync":
            path = self.home / "mbsyncrc"
            path.write_text(
                f"IMAPAccount server\nHost localhost\nPort {d.imaps_port}\nUser alice\n"
                f"Pass secret\nSSLType IMAPS\nSystemCertificates no\nCertificateFile {ca}\n\n"
                "IMAPStore remote\nAccount server\n\n"
                f"MaildirStore local\nPath {self.local}/\nInbox {self.local}/INBOX\n"
                "SubFolders Verbatim\n\n"
                "Channel all\nFar :remote:\nNear :local:\nPatterns *\nCreate Both\n"
                "Expunge Both\nSyncState *\nSync All\n"
            )
        else:
            path = self.home / "offlineimaprc"
            path.write_text(
                f"[general]\naccounts = server\nmetadata = {self.home}/metadata\n\n"
                "[Account server]\nlocalrepository = local\nremoterepository = remote\n"
                f"usecompression = {'yes' if self.compress else 'no'}\n\n"
                f"[Repository local]\ntype = Maildir\nlocalfolders = {self.local}\n\n"
                f"[Repository remote]\ntype = IMAP\nremotehost = localhost\n"
                f"remoteport = {d.imaps_port}\nremoteuser = alice\nremotepass = secret\n"
                # offlineimap3 wants a commonName, which trustme's certificates lack.
                f"ssl = yes\ncert_fingerprint = {server_fingerprint(d)}\n"
            )
        return path

    def command(self) -> list[str]:
        if self.kind == "mbsync":
            return ["mbsync", "-c", str(self.home / "mbsyncrc"), "-a"]
        return ["offlineimap", "-c", str(self.home / "offlineimaprc"), "-o", "-u", "basic"]

    def sync(self) -> None:
        """Run one sync; it must succeed and report no error."""
        self.runs += 1
        result = subprocess.run(
            self.command(),
            capture_output=True,
            timeout=CLIENT_TIMEOUT,
            env={**os.environ, "HOME": str(self.home)},
            stdin=subprocess.DEVNULL,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == 0, f"{self.kind} run {self.runs} failed:\n{output}"
        assert "error" not in output.lower(), f"{self.kind} run {self.runs}:\n{output}"

    def local_state(self) -> Counter[tuple[str, str, str]]:
        return messages_in(self.local)

    def local_files(self) -> Iterator[Path]:
        return (
            p
            for p in sorted(self.local.rglob("*"))
            if p.parent.name in ("cur", "new") and p.is_file()
        )


@attrs.define
class Pair:
    """The same client, configured alike, against the relayed and the direct Dovecot."""

    relayed: Client
    direct: Client

    @property
    def both(self) -> tuple[Client, Client]:
        return self.relayed, self.direct

    async def sync(self) -> None:
        for client in self.both:
            await trio.to_thread.run_sync(client.sync)

    def assert_same(self) -> None:
        assert self.relayed.local_state() == self.direct.local_state()
        assert server_state(self.relayed.dovecot) == server_state(self.direct.dovecot)

    def change_locally(self, round_: int) -> None:
        """The same local changes in both trees: a new message, a flag, a deletion."""
        for client in self.both:
            inbox = client.local / "INBOX"
            new = small_message(10_000 + round_)
            name = f"1700000001.local{round_}.test:2,S"
            (inbox / "cur" / name).write_bytes(new.replace(b"\r\n", b"\n"))
            # The same message in both trees: files sorted by content, not by name.
            files = sorted(
                (p for p in client.local_files() if ".local" not in p.name),
                key=lambda p: (file_digest(p), p.name),
            )
            flagged = files[round_ % len(files)]
            base, _, flags = flagged.name.rpartition(":2,")
            if "F" not in flags:
                flagged.rename(flagged.with_name(f"{base}:2,{''.join(sorted(flags + 'F'))}"))
            if round_ % 5 == 0:
                files[(round_ * 7 + 3) % len(files)].unlink()
            # mbsync waits for the next second when a maildir changed within the
            # current one (to see later changes): a second per run that would
            # only ever fall on whichever side runs first.
            past = time.time() - 2
            for directory in (inbox, inbox / "cur", inbox / "new"):
                os.utime(directory, (past, past))

    def deliver(self, round_: int) -> None:
        """The same new message on both servers."""
        for client in self.both:
            put_message(
                client.dovecot, "alice", small_message(20_000 + round_), f"1700000002.new{round_}"
            )


async def offers_compress(d: Dovecot) -> bool:
    async with await ImapClient.connect(
        d.host, d.imaps_port, ssl_context=d.client_ssl_context()
    ) as client:
        reply = await client.login("alice", "secret")
        assert reply.ok, reply
        offered = "COMPRESS=DEFLATE" in await client.capability()
        await client.logout()
    return offered


@asynccontextmanager
async def client_pair(
    kind: str, test_pki, dovecot_factory: StartDovecot, version: str, compress: bool
) -> AsyncIterator[Pair]:
    conf = COMPRESS_CONF[version, compress]
    async with AsyncExitStack() as stack:
        relayed = (
            await stack.enter_async_context(run_stack(test_pki, version=version, dovecot_conf=conf))
        ).dovecot
        direct = await trio.to_thread.run_sync(lambda: dovecot_factory(extra_conf=conf))
        for d in (relayed, direct):
            seed(d)
            # The test would prove nothing if the offer were not as intended.
            assert await offers_compress(d) is compress
        homes = [make_root(f"dovenotify-{kind}-") for _ in range(2)]
        for home in homes:
            stack.callback(shutil.rmtree, home, ignore_errors=True)
        pair = Pair(
            Client(kind, homes[0], relayed, compress), Client(kind, homes[1], direct, compress)
        )
        for client in pair.both:
            client.write_config()
        yield pair


@pytest.mark.parametrize("compress", [True, False], ids=["compress", "no-compress"])
async def test_mbsync_syncs_alike_through_the_relay(
    test_pki, dovecot_factory, dovecot_version, compress
):
    async with client_pair("mbsync", test_pki, dovecot_factory, dovecot_version, compress) as pair:
        await pair.sync()
        pair.assert_same()
        # Everything came down: not two identical failures.
        down = contents(pair.relayed.local_state())
        assert down == Counter(digest(m) for m in seed_messages())

        pair.change_locally(0)
        await pair.sync()
        pair.assert_same()
        up = contents(server_state(pair.relayed.dovecot))
        assert up[digest(small_message(10_000))] == 1
        assert sum(up.values()) == len(seed_messages())  # one added, one deleted

        for round_ in range(1, INCREMENTAL_RUNS + 1):
            pair.change_locally(round_)
            pair.deliver(round_)
            await pair.sync()
        pair.assert_same()
        assert pair.relayed.runs == INCREMENTAL_RUNS + 2
        final = contents(pair.relayed.local_state())
        assert final[digest(small_message(20_000 + INCREMENTAL_RUNS))] == 1


@pytest.mark.parametrize("compress", [True, False], ids=["compress", "no-compress"])
async def test_offlineimap_syncs_alike_through_the_relay(
    test_pki, dovecot_factory, dovecot_version, compress
):
    async with client_pair(
        "offlineimap", test_pki, dovecot_factory, dovecot_version, compress
    ) as pair:
        await pair.sync()
        pair.assert_same()
        assert contents(pair.relayed.local_state()) == Counter(digest(m) for m in seed_messages())

        pair.change_locally(0)
        pair.deliver(0)
        await pair.sync()
        pair.assert_same()
        up = contents(server_state(pair.relayed.dovecot))
        assert up[digest(small_message(10_000))] == 1
        assert contents(pair.relayed.local_state())[digest(small_message(20_000))] == 1
