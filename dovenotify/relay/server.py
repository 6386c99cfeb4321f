"""The relay: takes IMAP connections from the post-login helper and sits in the middle.

Per connection, bytes flow client→Dovecot through `imapscan.ClientScanner` and
Dovecot→client through `imapscan.ServerScanner`, until the relay steps out of the
session (see imapscan); then both directions are moved without a look, by splice
where the kernel can. XAPPLEPUSHSERVICE is answered here: the relay stores the
registration, sends Dovecot a NOOP under a tag of its own, and swaps Dovecot's
tagged reply to that NOOP for the XAPPLEPUSHSERVICE answer, so pipelined replies
keep their order. COMPRESS is Dovecot's: the relay forwards it and, once Dovecot
accepts it, steps out.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import resource
import socket
from collections.abc import Awaitable, Callable

import attrs
import trio

from dovenotify.relay import imapscan, xaps, zerocopy
from dovenotify.relay.handoff import (
    DescriptorsLost,
    Handoff,
    peer_uid,
    receive_handoff,
    user_name,
)
from dovenotify.store.base import Registration, short_token

log = logging.getLogger("dovenotify.relay")

BUFFER = 256 * 1024
# Literals at least this long bypass the scanner (spliced, or copied through a
# buffer of COPY_BUFFER bytes); shorter ones are not worth a pipe or a buffer.
SPLICE_MIN = 64 * 1024
COPY_BUFFER = 1024 * 1024
IDLE_BUFFER = 1.0
# Advertised in the sessions the relay still scans, where it answers the command.
CAPABILITY = b"XAPPLEPUSHSERVICE"
# Out of descriptors or memory: pause accepting for this long, then try again.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE = 0.1
_placeholder_tags = itertools.count(1)


Register = Callable[[Registration], Awaitable[None]]


@attrs.define
class Relay:
    topic: Callable[[], str]
    register: Register
    allowed_uids: frozenset[int]
    # Only the mailboxes a registration keeps are confirmed: iOS then knows the rest
    # will not push, instead of waiting for pushes that never come.
    mailboxes_per_registration: int = 100
    handshake_timeout: float = 2.0
    connections: int = 0
    starved: bool = False  # out of descriptors: said so in the log, once

    async def serve(self, listener: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED):
        _raise_open_file_limit()
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as e:
                    if e.errno not in _OUT_OF_RESOURCES:
                        raise
                    # Sessions already relayed go on; new logins wait out
                    # relay_timeout and go straight to Dovecot until some end.
                    self._starving(e.strerror or str(e))
                    await trio.sleep(ACCEPT_PAUSE)
                    continue
                nursery.start_soon(self._handle, stream, nursery)

    def _starving(self, reason: str) -> None:
        if not self.starved:
            log.error(
                "cannot take more relayed sessions (%s, %d open): new logins go on"
                " without push registration until some end",
                reason,
                self.connections,
            )
        self.starved = True

    async def _handle(self, control: trio.SocketStream, nursery: trio.Nursery) -> None:
        sock = control.socket
        handoff, fds, go = None, [], b""
        try:
            uid = peer_uid(sock)
            if uid not in self.allowed_uids:
                log.warning(
                    "refused a relay handoff from uid %s: only %s may hand over connections",
                    uid,
                    ", ".join(user_name(u) for u in sorted(self.allowed_uids)),
                )
                return
            with trio.move_on_after(self.handshake_timeout):
                try:
                    handoff, fds = await receive_handoff(sock)
                except DescriptorsLost:
                    self._starving("out of file descriptors")
                    return
                if handoff is not None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await control.send_all(b"OK\n")
                        go = await control.receive_some(16)
            if handoff is None or go != b"GO\n":
                # The helper gave up waiting and went on without us: the
                # connection is Dovecot's alone, so let go of it.
                for fd in fds:
                    os.close(fd)
                return
        finally:
            await control.aclose()
        if self.starved:
            log.warning("taking relayed sessions again (%d open)", self.connections)
            self.starved = False
        client_fd, server_fd = fds
        nursery.start_soon(self._relay, handoff, client_fd, server_fd)

    async def _relay(self, handoff: Handoff, client_fd: int, server_fd: int) -> None:
        client = trio.socket.from_stdlib_socket(socket.socket(fileno=client_fd))
        server = trio.socket.from_stdlib_socket(socket.socket(fileno=server_fd))
        # A plain client's fd is its TCP socket (a TLS client's is a unix socket
        # to imap-login). Our small answers must not wait for Nagle.
        tcp = client.family in (socket.AF_INET, socket.AF_INET6)
        if tcp:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        session = _Session(handoff, imapscan.ClientScanner(), imapscan.ServerScanner(CAPABILITY))
        try:
            with client, server:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._to_server, session, client, server, nursery, tcp)
                    nursery.start_soon(self._to_client, session, server, client, nursery, tcp)
        finally:
            self.connections -= 1

    async def _to_client(
        self,
        session: _Session,
        server: trio.socket.SocketType,
        client: trio.socket.SocketType,
        nursery: trio.Nursery,
        tcp: bool,
    ) -> None:
        replies = session.replies
        try:
            # Into a TCP socket, long literals are copied, not spliced. Copying
            # costs the relay a little more CPU, but the client spends far less
            # reading copied bytes (which TCP packs into its own large pages, as
            # it does Dovecot's writes) than spliced ones: 50 MB FETCH, plain,
            # relayed/direct went from 0.88 to 1.04 (0.80 to 0.89 under load).
            inlet = _Inlet(server, client, replies, splice=not tcp)
            while data := await inlet.receive():
                await zerocopy.send_joined(client, replies.feed(data))
                if (verdict := replies.take_verdict()) is not None:
                    session.decided(verdict)
        except OSError:
            pass
        # Dovecot hung up (LOGOUT, shutdown) or the client went away: either way
        # the session is over.
        nursery.cancel_scope.cancel()

    async def _to_server(
        self,
        session: _Session,
        client: trio.socket.SocketType,
        server: trio.socket.SocketType,
        nursery: trio.Nursery,
        tcp: bool,
    ) -> None:
        commands, replies = session.commands, session.replies
        try:
            inlet = _Inlet(client, server, commands, quickack=tcp)
            actions: collections.deque[imapscan.Action] = collections.deque()

            def queue(more: list[imapscan.Action]) -> None:
                if more and isinstance(more[-1], imapscan.AwaitVerdict):
                    # Before the command goes to Dovecot: its answer may come at once.
                    replies.expect(more[-1])
                actions.extend(more)

            while data := await inlet.receive():
                queue(commands.feed(data))
                # What one read brought goes on in one write, as the client sent it:
                # Dovecot then reads pipelined commands together, as it would direct.
                forward: list[bytes | memoryview] = []
                while actions:
                    action = actions.popleft()
                    if isinstance(action, imapscan.Forward):
                        forward.append(action.data)
                        continue
                    await zerocopy.send_joined(server, forward)
                    forward = []
                    if isinstance(action, imapscan.AwaitVerdict):
                        queue(commands.verdict(await session.verdict()))
                    else:
                        queue(await self._intercepted(session, server, action))
                await zerocopy.send_joined(server, forward)
                if commands.stepped_out:
                    replies.leave()
            # The client is gone: tell Dovecot, and let it close its side.
            server.shutdown(socket.SHUT_WR)
        except OSError:
            nursery.cancel_scope.cancel()

    async def _intercepted(
        self, session: _Session, server: trio.socket.SocketType, command: imapscan.Intercepted
    ) -> list[imapscan.Action]:
        # Dovecot answers a NOOP in this command's turn; that answer is swapped
        # for ours, so replies keep the client's order.
        tag = b"dovenotify.%d" % next(_placeholder_tags)
        answer, registered = await self._answer(session.handoff, command)
        session.replies.replace(tag, answer)
        await zerocopy.send_all(server, tag + b" NOOP\r\n")
        # A registered session has nothing more for the relay.
        return session.commands.resume(step_out=registered)

    async def _answer(self, handoff: Handoff, command: imapscan.Intercepted) -> tuple[bytes, bool]:
        """The answer to an XAPPLEPUSHSERVICE command, and whether it registered."""
        if command.problem:
            return xaps.bad(command.tag, command.problem), False
        try:
            request = xaps.parse(command.line)
        except xaps.XapsError as e:
            return xaps.bad(command.tag, str(e)), False
        topic = self.topic()
        registration = Registration(
            username=handoff.username,
            account_id=request.account_id,
            device_token=request.device_token,
            topic=topic,
            mailboxes=request.folders,
        )
        if not await store_registration(self.register, registration):
            return (
                xaps.no(command.tag, "the registration could not be stored, try again later"),
                False,
            )
        confirmed = request.mailboxes[: self.mailboxes_per_registration]
        return xaps.answer(command.tag, topic, confirmed), True


@attrs.define
class _Session:
    """One relayed session: its two scanners, and the handover of Dovecot's verdicts
    (seen by the server→client task) to the client→server task waiting for them."""

    handoff: Handoff
    commands: imapscan.ClientScanner
    replies: imapscan.ServerScanner
    _verdict: bool = False
    _decided: trio.Event | None = None

    async def verdict(self) -> bool:
        if self._decided is None:
            self._decided = trio.Event()
        await self._decided.wait()
        self._decided = None
        return self._verdict

    def decided(self, accepted: bool) -> None:
        self._verdict = accepted
        if self._decided is None:
            self._decided = trio.Event()
        self._decided.set()


@attrs.define
class _Inlet:
    """One direction's source of bytes for its scanner. Long literals in between go
    from `source` to `target` without it: by splice if `splice` and the kernel can,
    else copied through one buffer."""

    source: trio.socket.SocketType
    target: trio.socket.SocketType
    scanner: imapscan.ClientScanner | imapscan.ServerScanner
    quickack: bool = False
    splice: bool = True

    async def receive(self) -> bytes:
        """The next bytes for the scanner to look at; b"" when `source` has ended."""
        while self.scanner.opaque >= SPLICE_MIN:
            if not await (self._splice() if self.splice else self._copy()):
                return b""
        data = await self.source.recv(BUFFER)
        _quickack(self.source, self.quickack)
        return data

    async def _splice(self) -> bool:
        """Splice the long literal (or the stepped-out session) on; False when `source`
        ended first."""
        try:
            pipe = zerocopy.Pipe()
        except OSError as e:
            if e.errno not in _OUT_OF_RESOURCES:
                raise
            # No descriptors for a pipe: the session goes on, copied.
            return await self._copy()
        try:
            with contextlib.closing(pipe):
                while self.scanner.opaque >= SPLICE_MIN:
                    moved = await zerocopy.splice(
                        self.source, self.target, self.scanner.opaque, pipe
                    )
                    if not moved:
                        return False
                    self.scanner.bypassed(moved)
                    _quickack(self.source, self.quickack)
        except zerocopy.Unsupported as e:
            # These sockets cannot splice: copy instead.
            if e.moved:
                self.scanner.bypassed(e.moved)
            self.splice = False
        return True

    async def _copy(self) -> bool:
        """Copy the long literal (or the stepped-out session) on; False when `source`
        ended first. One buffer serves while data flows; it is dropped once the source
        has been dry for IDLE_BUFFER seconds, so that an idle stepped-out session
        holds none."""
        buffer: memoryview | None = None
        while self.scanner.opaque >= SPLICE_MIN:
            if buffer is None:
                await trio.lowlevel.wait_readable(self.source)
                buffer = memoryview(bytearray(min(self.scanner.opaque, COPY_BUFFER)))
            try:
                count = os.readv(
                    self.source.fileno(), [buffer[: min(self.scanner.opaque, len(buffer))]]
                )
            except BlockingIOError:
                with trio.move_on_after(IDLE_BUFFER) as idle:
                    await trio.lowlevel.wait_readable(self.source)
                if idle.cancelled_caught:
                    buffer = None
                continue
            if not count:
                return False
            self.scanner.bypassed(count)
            _quickack(self.source, self.quickack)
            await zerocopy.send_all(self.target, buffer[:count])
        return True


def _quickack(sock: trio.socket.SocketType, enabled: bool) -> None:
    """ACK a TCP client at once: it may be waiting for that ACK before sending more
    (an APPEND's literal), and Linux re-enables delayed ACKs after each read."""
    if enabled:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _raise_open_file_limit() -> None:
    """Each relayed session holds two descriptors: allow as many as the hard limit does
    (systemd's soft limit of 1024 would otherwise cap the relay at ~500 sessions)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def store_registration(register: Register, registration: Registration, via: str = "") -> bool:
    """Store a registration durably and log it; False (logged) when the store failed.

    Shared by the relay and the xapsd API: both must answer "try again" rather
    than OK when nothing was stored.
    """
    try:
        await register(registration)
    except Exception as e:
        log.error("could not store the registration of %s%s: %s", registration.username, via, e)
        return False
    log.info(
        "registered %s account %s device %s for %s%s",
        registration.username,
        registration.account_id,
        short_token(registration.device_token),
        ", ".join(registration.mailboxes),
        via,
    )
    return True
