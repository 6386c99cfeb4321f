"""A small HTTP/1.1 server for dovenotify's local endpoints (metrics, xapsd API).

h11 does the protocol (sans-I/O); this module only moves bytes between it and a
trio stream, one request at a time per connection, keep-alive included. The
endpoints are local and tiny, so bodies are capped and slow peers time out.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import h11
import trio

from .listening import serve_limited

log = logging.getLogger("dovenotify.http")

MAX_BODY = 64 * 1024
# Short, because connections are capped: idle ones give their place up soon.
IDLE_TIMEOUT = 10.0
DEFAULT_CONNECTIONS = 64
SERVER = b"dovenotify"


Address = tuple[str, int]


@attrs.frozen
class Request:
    method: str
    path: str
    body: bytes
    # The TCP connection's two ends (host, port), to tell who is asking.
    peer: Address | None = None
    local: Address | None = None


@attrs.frozen
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[Request], Awaitable[Response]]


class _TooLarge(Exception):
    pass


async def serve_http(
    listeners: list[trio.SocketListener], handle: Handler, limit: int = DEFAULT_CONNECTIONS
) -> None:
    """Serve; past `limit` open connections, new ones wait until one closes."""
    await serve_limited(
        listeners, lambda stream: _connection(stream, handle), limit, "HTTP connections"
    )


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    return await trio.open_tcp_listeners(port, host=host)


async def _connection(stream: trio.SocketStream, handle: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    ends = _ends(stream)
    async with stream:
        while True:
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    request = await _read_request(conn, stream, ends)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            except h11.RemoteProtocolError as e:
                await _try_send(conn, stream, Response(e.error_status_hint, b"bad request\n"))
                return
            except _TooLarge:
                await _try_send(conn, stream, Response(413, b"request body too large\n"))
                return
            if request is None:
                return
            try:
                response = await handle(request)
            except Exception:
                # One failed request (say, the database is away) must not take
                # the service down with it.
                log.exception("%s %s failed", request.method, request.path)
                response = Response(500, b"internal error, see dovenotify's log\n")
            if not await _try_send(conn, stream, response):
                return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return


def _ends(stream: trio.SocketStream) -> tuple[Address | None, Address | None]:
    try:
        peer, local = stream.socket.getpeername(), stream.socket.getsockname()
    except OSError:
        return None, None
    return (peer[0], peer[1]), (local[0], local[1])


async def _read_request(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    ends: tuple[Address | None, Address | None],
) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.ConnectionClosed):
            return None
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            path = head.target.decode("ascii", "replace").split("?", 1)[0]
            return Request(head.method.decode("ascii", "replace"), path, bytes(body), *ends)


async def _try_send(conn: h11.Connection, stream: trio.abc.Stream, response: Response) -> bool:
    headers = [(b"server", SERVER)]
    # 204 and 304 carry no body, and so no body headers.
    if response.status not in (204, 304):
        headers += [
            (b"content-type", response.content_type.encode()),
            (b"content-length", str(len(response.body)).encode()),
        ]
    try:
        data = conn.send(h11.Response(status_code=response.status, headers=headers))
        if response.body:
            data += conn.send(h11.Data(data=response.body))
        data += conn.send(h11.EndOfMessage())
        await stream.send_all(data)
    except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True
