"""Send pushes to APNs over one long-lived HTTP/2 connection (h2 on trio).

`send` never raises for network trouble: whatever goes wrong comes back as a
retry Outcome for the caller's backoff. The HTTP/2 rules live in `http2_client`;
this is the trio shell around them:

- The connection opens on the first push, and again on the push after it is lost.
  One reader task hands each answer to the push waiting for it; one writer task
  sends whatever frames have piled up in one TLS write.
- A push the server never processed (above a GOAWAY's last stream id, a refused
  stream, still queued when the connection went) is sent again on a new
  connection at once: nothing lost, nothing twice.
- A connection that has been silent for `idle_ping` seconds gets a PING, and one
  that does not answer it within `timeout` is dropped, so a connection that died
  quietly is found before a push has to wait on it.

The connection's tasks run in the sender's own nursery: use it as
`async with ApnsSender(...) as sender:`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

import attrs
import h2.exceptions
import trio

from dovenotify import __version__
from dovenotify.apns import (
    PRODUCTION,
    Action,
    Outcome,
    Push,
    Request,
    build_request,
    classify,
    transport_failure,
)
from dovenotify.apns_token import TokenSigner
from dovenotify.certificates import Credentials, client_ssl_context
from dovenotify.http2_client import Answered, ClientConnection, Event, Headers, Unanswered

log = logging.getLogger("dovenotify")

# Streams in flight on the connection, unless the server allows fewer.
DEFAULT_MAX_IN_FLIGHT = 64
# Seconds of silence after which the connection is checked with a PING.
IDLE_PING = 60.0
# Sends of one push, when the earlier ones were certainly not processed (GOAWAY,
# refused stream) or the connection went before an answer came (only once then).
MAX_ATTEMPTS = 3
RECEIVE_SIZE = 65536
USER_AGENT = f"dovenotify/{__version__}".encode()

_NETWORK_ERRORS = (OSError, ssl.SSLError, trio.BrokenResourceError, h2.exceptions.H2Error)

# TLS alerts by which a server refuses the client certificate (OpenSSL's names).
_CERTIFICATE_ALERTS = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_",  # _EXPIRED, _REVOKED, _UNKNOWN, _UNSUPPORTED, _REQUIRED
    "ALERT_ACCESS_DENIED",
    "ALERT_HANDSHAKE_FAILURE",
)


@attrs.frozen
class _Link:
    """Where and how to connect: what a reload may change."""

    host: str
    port: int
    authority: bytes
    context: ssl.SSLContext
    token: TokenSigner | None
    timeout: float


class _Unreachable(Exception):
    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class _Exchange:
    """One request on the wire, and the event that ends it (the connection's ticket)."""

    __slots__ = ("done", "event")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.event: Answered | Unanswered | None = None


class _Attempt:
    """A connection being opened; every push that wants one waits for the same."""

    __slots__ = ("done", "failure", "link")

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.done = trio.Event()
        self.failure: Outcome | None = None


class ApnsSender:
    def __init__(
        self,
        credentials: Credentials | None = None,
        *,
        token: TokenSigner | None = None,
        endpoint: str = PRODUCTION,
        ca_file: Path | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout: float = 10,
        idle_ping: float = IDLE_PING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._max_in_flight = max_in_flight
        self._idle_ping = idle_ping
        self._nursery: trio.Nursery | None = None
        self._exit_stack = contextlib.AsyncExitStack()
        self._current: _Connection | None = None
        self._attempt: _Attempt | None = None
        self._connections: set[_Connection] = set()
        self._closed = False
        self.configure(
            credentials, token=token, endpoint=endpoint, ca_file=ca_file, timeout=timeout
        )

    def configure(
        self,
        credentials: Credentials | None,
        *,
        token: TokenSigner | None = None,
        endpoint: str = PRODUCTION,
        ca_file: Path | None = None,
        timeout: float = 10,
    ) -> None:
        """Connect with these from now on (a reload). The connection in use takes no
        new pushes; those in flight on it finish there."""
        self.endpoint = endpoint.rstrip("/")
        url = urlsplit(self.endpoint)
        self._link = _Link(
            host=url.hostname or "",
            port=url.port or 443,
            authority=url.netloc.encode(),
            context=client_ssl_context(credentials, ca_file),
            token=token,
            timeout=timeout,
        )
        if self._current is not None:
            self._current.drain()
            self._current = None

    # --- sending ------------------------------------------------------------------

    async def send(self, push: Push) -> Outcome:
        """Send one push; the Outcome says what to do with the registration."""
        if self._nursery is None:
            raise RuntimeError("ApnsSender.send: use the sender as `async with sender:`")
        request = build_request(push, self._clock())
        renewed = False
        attempts = 0
        while True:
            attempts += 1
            try:
                connection = await self._connection()
            except _Unreachable as unreachable:
                return unreachable.outcome
            event = await connection.exchange(_headers(request, connection.link), request.body)
            if isinstance(event, Answered):
                outcome = classify(event.status, event.body, _apns_id(event))
                if renewed or not self._renewed_token(outcome):
                    return outcome
                renewed = True
            elif event is None:
                return transport_failure(
                    f"ReadTimeout: APNs did not answer within {connection.link.timeout:g} s"
                )
            elif attempts >= MAX_ATTEMPTS or (event.processed and attempts > 1):
                return transport_failure(event.reason)
            # Not processed, or lost with the connection: again, on a new connection.

    def _renewed_token(self, outcome: Outcome) -> bool:
        token = self._link.token
        return (
            token is not None
            and outcome.action is Action.CONFIG_ERROR
            and outcome.reason == "ExpiredProviderToken"
            and token.expired()
        )

    async def _connection(self) -> _Connection:
        """The connection to send on: the open one, or a new one (shared by all who wait)."""
        opened = 0
        while True:
            current = self._current
            if current is not None and not current.closing:
                return current
            if self._closed:
                raise _Unreachable(transport_failure("ConnectError: the APNs sender is closed"))
            if opened == 2:
                # New connections that went at once: not worth hammering on.
                raise _Unreachable(
                    transport_failure("ConnectError: APNs closed each new connection")
                )
            opened += 1
            self._current = None
            attempt = self._attempt
            if attempt is None:
                attempt = self._attempt = _Attempt(self._link)
                assert self._nursery is not None
                self._nursery.start_soon(self._connect_and_serve, attempt)
            await attempt.done.wait()
            if attempt.failure is not None:
                raise _Unreachable(attempt.failure)

    async def _connect_and_serve(self, attempt: _Attempt) -> None:
        try:
            stream, protocol = await self._connect(attempt.link)
        except _Unreachable as unreachable:
            attempt.failure = unreachable.outcome
            return
        finally:
            if self._attempt is attempt:
                self._attempt = None
            attempt.done.set()
        connection = _Connection(stream, protocol, attempt.link, self._idle_ping)
        self._connections.add(connection)
        if self._closed or attempt.link is not self._link:
            connection.drain()  # opened for settings since replaced
        else:
            self._current = connection
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)
            if self._current is connection:
                self._current = None
            await trio.aclose_forcefully(stream)

    async def _connect(self, link: _Link) -> tuple[trio.SSLStream, ClientConnection]:
        tcp: trio.SocketStream | None = None
        connected = False
        try:
            with trio.move_on_after(link.timeout):
                tcp = await trio.open_tcp_stream(link.host, link.port)
                stream = trio.SSLStream(
                    tcp, link.context, server_hostname=link.host, https_compatible=True
                )
                await stream.do_handshake()
                if stream.selected_alpn_protocol() != "h2":
                    raise _Unreachable(
                        transport_failure("ConnectError: the server does not speak HTTP/2")
                    )
                protocol = ClientConnection(self._max_in_flight)
                await stream.send_all(protocol.data_to_send())
                # Until the server's SETTINGS arrive its stream limit is unknown.
                while not protocol.settled:
                    data = await stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        raise trio.BrokenResourceError("the server closed the connection")
                    protocol.receive(data)
                connected = True
                return stream, protocol
        except _NETWORK_ERRORS as error:
            failure = _refused_certificate(error)
            raise _Unreachable(
                failure
                or transport_failure(f"ConnectError: {connect_cause(error, link.host, link.port)}")
            ) from error
        finally:
            if tcp is not None and not connected:
                await trio.aclose_forcefully(tcp)
        raise _Unreachable(
            transport_failure(f"ConnectTimeout: no connection to APNs within {link.timeout:g} s")
        )

    # --- closing ------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop: pushes in flight come back as retries; later ones are retries at once."""
        self._closed = True
        self._current = None
        for connection in list(self._connections):
            connection.end("ConnectError: the APNs sender is closed")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def __aenter__(self) -> ApnsSender:
        self._nursery = await self._exit_stack.enter_async_context(trio.open_nursery())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
        await self._exit_stack.__aexit__(exc_type, exc, traceback)


class _Connection:
    """One TLS connection and its reader, writer and watchdog tasks."""

    def __init__(
        self, stream: trio.SSLStream, protocol: ClientConnection, link: _Link, idle_ping: float
    ) -> None:
        self.link = link
        self._stream = stream
        self._protocol = protocol
        self._idle_ping = idle_ping
        self._heard_at = trio.current_time()
        self._wanted = trio.Event()  # frames to write
        self._check = trio.Event()  # a PING is wanted now
        self._ping_acked = trio.Event()
        self._scope = trio.CancelScope()
        self._reason: str | None = None

    @property
    def closing(self) -> bool:
        return self._reason is not None or self._protocol.closing

    async def exchange(self, headers: Headers, body: bytes) -> Answered | Unanswered | None:
        """The answer to one request; None if none came within the timeout."""
        exchange = _Exchange()
        self._deliver(self._protocol.submit(exchange, headers, body))
        self._wanted.set()
        try:
            with trio.move_on_after(self.link.timeout):
                await exchange.done.wait()
        finally:
            if exchange.event is None and self._reason is None:
                self._protocol.cancel(exchange)
                self._wanted.set()
                if self._protocol.finished:
                    self.end("finished")
        if exchange.event is None:
            # One stream hung, or the whole connection: a PING tells which.
            self._check.set()
        return exchange.event

    def drain(self) -> None:
        self._deliver(self._protocol.drain())
        if self._protocol.finished:
            self.end("replaced")

    def end(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason
        self._scope.cancel()

    async def serve(self) -> None:
        """Run until the connection ends; then every request still on it is answered."""
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._read, "ReadError")
                    nursery.start_soon(self._guard, self._write, "WriteError")
                    nursery.start_soon(self._watch)
        finally:
            reason = self._reason or "the connection ended"
            log.debug("APNs connection closed: %s", reason)
            self._deliver(self._protocol.lost(reason))

    async def _guard(self, task: Callable[[], Awaitable[None]], kind: str) -> None:
        try:
            await task()
        except _NETWORK_ERRORS as error:
            self.end(f"{kind}: {_describe(error)}")

    async def _read(self) -> None:
        while True:
            data = await self._stream.receive_some(RECEIVE_SIZE)
            if not data:
                self.end("ReadError: APNs closed the connection")
                return
            self._heard_at = trio.current_time()
            self._deliver(self._protocol.receive(data))
            self._wanted.set()
            if self._protocol.finished:
                self.end(self._protocol.goaway_reason or "replaced")
                return

    async def _write(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            if data := self._protocol.data_to_send():
                await self._stream.send_all(data)

    async def _watch(self) -> None:
        while True:
            with trio.move_on_at(self._heard_at + self._idle_ping):
                await self._check.wait()
            if not self._check.is_set() and trio.current_time() < self._heard_at + self._idle_ping:
                continue  # heard from the server meanwhile
            self._check = trio.Event()
            acked = self._ping_acked = trio.Event()
            self._protocol.ping()
            self._wanted.set()
            with trio.move_on_after(self.link.timeout):
                await acked.wait()
            if not acked.is_set():
                self.end(f"ReadTimeout: APNs did not answer a PING within {self.link.timeout:g} s")
                return

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, Answered | Unanswered):
                exchange = event.ticket
                assert isinstance(exchange, _Exchange)
                exchange.event = event
                exchange.done.set()
            else:
                self._ping_acked.set()


def _headers(request: Request, link: _Link) -> Headers:
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", link.authority),
        (b":path", request.path.encode()),
        *[(name.encode(), value.encode()) for name, value in request.headers.items()],
        (b"user-agent", USER_AGENT),
    ]
    if link.token is not None:
        headers.append((b"authorization", f"bearer {link.token.token()}".encode()))
    return headers


def _apns_id(answer: Answered) -> str | None:
    value = answer.header(b"apns-id")
    return value.decode("latin-1") if value is not None else None


def _refused_certificate(error: BaseException) -> Outcome | None:
    """APNs refused our client certificate in the TLS handshake: not worth retrying."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLCertVerificationError):
            text = str(cause)
            if any(alert in text for alert in _CERTIFICATE_ALERTS):
                return Outcome(
                    Action.CONFIG_ERROR,
                    None,
                    f"APNs refused our client certificate in the TLS handshake ({text})",
                )
        cause = cause.__cause__ or cause.__context__
    return None


def connect_cause(error: BaseException, host: str, port: int) -> str:
    """Why no connection came up, in words an admin can act on (DNS, refused, TLS).

    Stable for one cause, since the service reports an outage once per cause.
    """
    causes: list[BaseException] = []
    pending: list[BaseException] = [error]
    while pending:
        cause = pending.pop()
        causes.append(cause)
        if isinstance(cause, BaseExceptionGroup):
            pending.extend(cause.exceptions)
        pending.extend(c for c in (cause.__cause__, cause.__context__) if c is not None)
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return f"DNS lookup of {host} failed ({cause.strerror})"
        if isinstance(cause, ssl.SSLError):
            return f"TLS handshake with {host} failed ({cause.reason or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return f"{host} port {port} refused the connection"
    for cause in causes:
        if isinstance(cause, OSError) and cause.strerror:
            return f"{host} port {port}: {cause.strerror}"
    return _describe(error)


def _describe(error: BaseException) -> str:
    detail = str(error) or repr(error)
    return f"{type(error).__name__}: {detail}"
