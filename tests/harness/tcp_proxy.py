"""A TCP proxy on 127.0.0.1 that can turn the connections through it into a black hole.

Between a client and a server, it forwards bytes both ways until `black_hole()`:
from then on the connections open at that moment carry nothing either way, while
staying open, as a connection does whose path died silently (a NAT entry
expired, a host vanished). Connections opened later pass again. The proxy
still reads what the client sends into the hole, so it sees when the client
gives up on it (`dropped`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
import trio


@attrs.define(eq=False)
class _Pair:
    client: trio.SocketStream
    server: trio.SocketStream
    silent: bool = False


@attrs.define(eq=False)
class TcpProxy:
    port: int
    target_port: int
    accepted: int = 0
    # Set when the client closes a connection that was in the black hole.
    dropped: trio.Event = attrs.field(factory=trio.Event)
    _pairs: list[_Pair] = attrs.field(factory=list)

    def black_hole(self) -> None:
        for pair in self._pairs:
            pair.silent = True

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        async with client, await trio.open_tcp_stream("127.0.0.1", self.target_port) as server:
            pair = _Pair(client, server)
            self._pairs.append(pair)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, pair, client, server, nursery.cancel_scope)
                nursery.start_soon(self._forward, pair, server, client, nursery.cancel_scope)
            self._pairs.remove(pair)

    async def _forward(
        self,
        pair: _Pair,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        done: trio.CancelScope,
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                if not pair.silent:
                    await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        if pair.silent and source is pair.client:
            self.dropped.set()
        done.cancel()


@asynccontextmanager
async def run_tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """Forward 127.0.0.1:proxy.port to 127.0.0.1:target_port until the block ends."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    proxy = TcpProxy(port=listener.socket.getsockname()[1], target_port=target_port)
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, proxy._handle, [listener])
        yield proxy
        nursery.cancel_scope.cancel()
