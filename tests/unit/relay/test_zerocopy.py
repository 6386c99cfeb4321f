"""Splicing between real sockets, and the fallback when the kernel refuses a splice."""

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterator

import pytest
import trio

from dovenotify.relay import zerocopy


@pytest.fixture
def pair() -> Iterator[Callable[[], tuple[trio.socket.SocketType, trio.socket.SocketType]]]:
    """Connected socket pairs, closed when the test ends."""
    with contextlib.ExitStack() as stack:

        def make() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
            a, b = (
                stack.enter_context(trio.socket.from_stdlib_socket(s)) for s in socket.socketpair()
            )
            return a, b

        yield make


async def receive_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += await sock.recv(size - len(data))
    return data


async def test_splice_moves_bytes_and_stops_at_the_limit(pair):
    sender, source = pair()
    target, receiver = pair()
    payload = os.urandom(3 * 1024 * 1024)
    received = []

    async def receive() -> None:
        received.append(await receive_exactly(receiver, len(payload)))

    with contextlib.closing(zerocopy.Pipe()) as pipe, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(zerocopy.send_all, sender, payload + b"after")
            nursery.start_soon(receive)
            moved = 0
            while moved < len(payload):
                moved += await zerocopy.splice(source, target, len(payload) - moved, pipe)
    assert received == [payload]
    assert await source.recv(100) == b"after"


async def test_a_refused_splice_still_delivers_what_it_took(pair, monkeypatch):
    sender, source = pair()
    target, receiver = pair()
    real_splice = os.splice

    def refuse_target(src, dst, count, **kwargs):
        if dst == target.fileno():
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, **kwargs)

    monkeypatch.setattr(os, "splice", refuse_target)
    await sender.send(b"x" * 1000)
    with contextlib.closing(zerocopy.Pipe()) as pipe, pytest.raises(zerocopy.Unsupported) as e:
        await zerocopy.splice(source, target, 1000, pipe)
    assert e.value.moved == 1000
    assert await receive_exactly(receiver, 1000) == b"x" * 1000
