"""A tiny trio IMAP client for tests; it can play the iPhone.

    client = await ImapClient.connect("127.0.0.1", port, ssl_context=ctx)
    await client.login("alice", "secret")
    reply = await client.xapplepushservice(ACCOUNT_ID, TOKEN, ["INBOX"])
    assert reply.ok, reply
    await client.logout()

Each command returns a `Reply`: the untagged lines in order and the tagged one.
Literals in responses are read whole and kept inline in their line.
"""

from __future__ import annotations

import re
import ssl
import zlib
from collections.abc import Iterable, Sequence

import attrs
import trio

IOS_SUBTOPIC = "com.apple.mobilemail"
_LITERAL = re.compile(rb"~?\{(\d+)\+?\}\r\n$")


def quote(text: str) -> str:
    """An IMAP quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@attrs.frozen
class Reply:
    tag: str
    untagged: tuple[bytes, ...]
    tagged: bytes

    @property
    def status(self) -> str:
        parts = self.tagged.split(b" ", 2)
        return parts[1].decode("ascii", "replace").upper() if len(parts) > 1 else ""

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def untagged_starting(self, prefix: bytes) -> list[bytes]:
        """Untagged lines whose text after "* " starts with `prefix` (case-insensitive)."""
        prefix = b"* " + prefix.upper()
        return [line for line in self.untagged if line.upper().startswith(prefix)]


class ImapClient:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.greeting = b""
        self._buffer = bytearray()
        self._next_tag = 1

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str = "localhost",
    ) -> ImapClient:
        """Connect (TLS when `ssl_context` is given) and read the greeting."""
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        try:
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_hostname=server_hostname)
                await stream.do_handshake()
            client = cls(stream)
            client.greeting = await client.read_response()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return client

    # --- raw access, for pipelining, IDLE and other tests of the wire -------

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _read_line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"connection closed; unterminated data: {bytes(self._buffer)!r}")
            self._buffer += chunk
        line = bytes(self._buffer[: end + 2])
        del self._buffer[: end + 2]
        return line

    async def _read_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("connection closed inside a literal")
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    async def read_response(self) -> bytes:
        """One response line without its final CRLF, literals included inline."""
        line = await self._read_line()
        while (match := _LITERAL.search(line)) is not None:
            line += await self._read_exactly(int(match[1]))
            line += await self._read_line()
        return line[:-2]

    def new_tag(self) -> str:
        tag = f"A{self._next_tag}"
        self._next_tag += 1
        return tag

    async def read_until_tagged(self, tag: str) -> Reply:
        untagged = []
        prefix = tag.encode() + b" "
        while True:
            line = await self.read_response()
            if line.startswith(prefix):
                return Reply(tag, tuple(untagged), line)
            untagged.append(line)

    # --- commands ---------------------------------------------------------

    async def command(self, text: str) -> Reply:
        """Send `<tag> <text>` and collect responses until the tagged one."""
        tag = self.new_tag()
        await self.send_raw(f"{tag} {text}\r\n".encode())
        return await self.read_until_tagged(tag)

    async def login(self, user: str, password: str) -> Reply:
        reply = await self.command(f"LOGIN {quote(user)} {quote(password)}")
        if not reply.ok:
            raise AssertionError(f"LOGIN failed: {reply}")
        return reply

    async def capability(self) -> set[str]:
        reply = await self.command("CAPABILITY")
        words: set[str] = set()
        for line in reply.untagged_starting(b"CAPABILITY"):
            words.update(w.decode().upper() for w in line.split()[2:])
        return words

    async def xapplepushservice(
        self,
        account_id: str,
        device_token: str,
        mailboxes: Sequence[str],
        subtopic: str = IOS_SUBTOPIC,
        version: str = "2",
    ) -> Reply:
        """Exactly what iOS Mail sends: quoted keys and values, mailboxes last."""
        boxes = " ".join(quote(m) for m in mailboxes)
        return await self.command(
            f'XAPPLEPUSHSERVICE "aps-version" {quote(version)}'
            f' "aps-account-id" {quote(account_id)}'
            f' "aps-device-token" {quote(device_token)}'
            f' "aps-subtopic" {quote(subtopic)}'
            f' "mailboxes" ({boxes})'
        )

    async def append(self, mailbox: str, message: bytes, flags: Iterable[str] = ()) -> Reply:
        """APPEND with a synchronizing literal (waits for the server's "+")."""
        tag = self.new_tag()
        flag_list = f"({' '.join(flags)}) " if flags else ""
        await self.send_raw(
            f"{tag} APPEND {quote(mailbox)} {flag_list}{{{len(message)}}}\r\n".encode()
        )
        untagged = []
        while not (line := await self.read_response()).startswith(b"+"):
            if line.startswith(tag.encode() + b" "):
                return Reply(tag, tuple(untagged), line)  # refused before the literal
            untagged.append(line)
        await self.send_raw(message + b"\r\n")
        reply = await self.read_until_tagged(tag)
        return Reply(tag, (*untagged, *reply.untagged), reply.tagged)

    async def compress(self) -> Reply:
        """COMPRESS DEFLATE; once it is accepted, both directions are deflated (RFC 4978)."""
        tag = self.new_tag()
        await self.send_raw(f"{tag} COMPRESS DEFLATE\r\n".encode())
        # The client deflates from the byte after its command; the server from
        # the byte after its OK: read that OK plain.
        self.stream = DeflateStream(self.stream)
        reply = await self.read_until_tagged(tag)
        if reply.ok:
            self.stream.start_inflating(bytes(self._buffer))
            self._buffer.clear()
        else:
            self.stream = self.stream.inner
        return reply

    async def logout(self) -> None:
        try:
            await self.command("LOGOUT")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> ImapClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class DeflateStream(trio.abc.Stream):
    """A stream that deflates what it sends; and, once started, inflates what it receives."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self._deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
        self._inflate: zlib._Decompress | None = None
        self._pending = b""
        self.sent_compressed = 0  # bytes that went over the wire

    def start_inflating(self, already_received: bytes) -> None:
        self._inflate = zlib.decompressobj(-15)
        self._pending = self._inflate.decompress(already_received)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        wire = self._deflate.compress(bytes(data)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)
        self.sent_compressed += len(wire)
        await self.inner.send_all(wire)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._pending:
            data = await self.inner.receive_some(max_bytes)
            if not data or self._inflate is None:
                return data
            self._pending = self._inflate.decompress(data)
        data, self._pending = self._pending, b""
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()
