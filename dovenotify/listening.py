"""Accepting connections when descriptors (or memory) run out: pause, retry, say so once.

trio's own `serve_listeners` logs a traceback every 0.1 s while accept fails;
the event socket and the HTTP endpoints use this instead, so an exhausted
descriptor table costs new connections a short wait and the log two lines.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attrs
import trio

log = logging.getLogger("dovenotify")

ACCEPT_PAUSE = 0.1
# Accepting again is told only after this long without a failure: at the limit,
# each closed connection lets one more in, and the log need not say so each time.
RECOVERED_AFTER = 5.0


@attrs.define
class Acceptor:
    listener: trio.SocketListener
    # What is accepted, for the log: "event connections".
    what: str
    starved: bool = False
    _failed_at: float = 0.0

    async def accept(self) -> trio.SocketStream:
        while True:
            try:
                stream = await self.listener.accept()
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connections already open
                # go on; new ones wait in the listen queue until some close.
                if not self.starved:
                    log.warning(
                        "cannot accept %s (%s): pausing until some close; they wait meanwhile",
                        self.what,
                        e.strerror or e,
                    )
                    self.starved = True
                self._failed_at = trio.current_time()
                await trio.sleep(ACCEPT_PAUSE)
                continue
            if self.starved and trio.current_time() - self._failed_at > RECOVERED_AFTER:
                log.warning("accepting %s again", self.what)
                self.starved = False
            return stream  # type: ignore[return-value]


async def serve_limited(
    listeners: list[trio.SocketListener],
    handler: Callable[[trio.SocketStream], Awaitable[None]],
    limit: int,
    what: str,
) -> None:
    """Run `handler(stream)` for each connection, at most `limit` at once."""
    room = trio.Semaphore(limit)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            room.release()

    async def serve_one(listener: trio.SocketListener) -> None:
        acceptor = Acceptor(listener, what)
        async with listener:
            while True:
                await room.acquire()
                nursery.start_soon(handle, await acceptor.accept())

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(serve_one, listener)
