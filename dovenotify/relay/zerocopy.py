"""Moving bytes from socket to socket inside the kernel (splice through a pipe), under trio.

The relay uses it for the bulk of large literals (a 50 MB APPEND, or a FETCH by a
TLS client, whose connection is a unix socket to imap-login): the bytes never
enter Python, which leaves the CPU to Dovecot and the client. Into a TCP socket
the relay copies instead (see relay._to_client).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

import trio

# A bigger pipe moves more per system call; the kernel caps it (pipe-max-size).
PIPE_SIZE = 1 << 20
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# What splice answers for a socket type it cannot handle, before anything moved.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class Unsupported(Exception):
    """These descriptors cannot splice. `moved` bytes went to the target all the same."""

    def __init__(self, moved: int = 0) -> None:
        super().__init__(f"splice is not supported here ({moved} bytes moved by copying)")
        self.moved = moved


class Pipe:
    """The kernel buffer a splice goes through; one per transfer, closed after it."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)

    def close(self) -> None:
        os.close(self.read_end)
        os.close(self.write_end)


async def splice(
    source: trio.socket.SocketType, target: trio.socket.SocketType, limit: int, pipe: Pipe
) -> int:
    """Move up to `limit` bytes from `source` to `target`; return how many (0: source ended)."""
    await trio.lowlevel.checkpoint()
    while True:
        try:
            moved = os.splice(source.fileno(), pipe.write_end, min(limit, PIPE_SIZE), flags=_FLAGS)
            break
        except BlockingIOError:
            await trio.lowlevel.wait_readable(source)
        except OSError as e:
            if e.errno in _UNSUPPORTED:
                raise Unsupported() from e
            raise
    left = moved
    while left:
        try:
            left -= os.splice(pipe.read_end, target.fileno(), left, flags=_FLAGS)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(target)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            # The bytes are in the pipe already: deliver them the ordinary way.
            await send_all(target, _read_exactly(pipe.read_end, left))
            raise Unsupported(moved) from e
    return moved


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, size)
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


async def send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def send_joined(sock: trio.socket.SocketType, pieces: list[bytes | memoryview]) -> None:
    """Send `pieces` in one write: fewer system calls, and the reader gets them together."""
    if len(pieces) > 1:
        await send_all(sock, b"".join(pieces))
    elif pieces:
        await send_all(sock, pieces[0])
