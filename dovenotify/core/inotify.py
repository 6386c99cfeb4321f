"""Linux inotify on one directory, through libc (ctypes): no dependency, no C to build.

`parse` turns what the kernel returns on the descriptor into events (pure, tested
without a kernel); `Watch` is the descriptor. The caller waits for it to be
readable (trio.lowlevel.wait_readable) and then reads it without blocking.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from pathlib import Path

import attrs

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# struct inotify_event: int wd; uint32_t mask, cookie, len; char name[len].
_HEADER = struct.Struct("iIII")
# Enough for hundreds of events per read; the kernel never splits one.
READ_SIZE = 64 * 1024


@attrs.frozen
class Event:
    wd: int
    mask: int
    cookie: int
    name: str


def parse(buffer: bytes) -> list[Event]:
    """The events in one read of an inotify descriptor.

    Names are NUL-padded to an alignment; they are decoded as file names are
    (surrogateescape), so any byte a hostile creator chose round-trips to os calls.
    """
    events = []
    at = 0
    while at + _HEADER.size <= len(buffer):
        wd, mask, cookie, size = _HEADER.unpack_from(buffer, at)
        at += _HEADER.size
        if at + size > len(buffer):
            raise ValueError(f"inotify event names {size} bytes, {len(buffer) - at} left")
        raw = buffer[at : at + size].split(b"\0", 1)[0]
        at += size
        events.append(Event(wd, mask, cookie, os.fsdecode(raw)))
    if at != len(buffer):
        raise ValueError(f"{len(buffer) - at} bytes after the last inotify event")
    return events


_CAUSES = {
    errno.ENOSYS: "this kernel has no inotify",
    errno.EMFILE: "this user has all the inotify instances it may"
    " (sysctl fs.inotify.max_user_instances)",
    errno.ENOSPC: "this user has all the inotify watches it may"
    " (sysctl fs.inotify.max_user_watches)",
    errno.ENFILE: "the system has run out of open files",
    errno.ENOMEM: "the kernel is out of memory",
}


def cause(e: OSError) -> str:
    """Why a watch could not be had, for a person reading the log."""
    return _CAUSES.get(e.errno or 0) or e.strerror or str(e)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str, path: Path | None = None) -> int:
    if result < 0:
        code = ctypes.get_errno()
        if path is None:
            raise OSError(code, f"{what}: {os.strerror(code)}")
        raise OSError(code, f"{what}: {os.strerror(code)}", str(path))
    return result


@attrs.define
class Watch:
    """An inotify descriptor watching one directory for `mask`."""

    fd: int
    wd: int

    @classmethod
    def open(cls, path: Path, mask: int) -> Watch:
        """Raises OSError when this system or file system cannot: ENOSYS (no inotify),
        EMFILE (too many instances), ENOSPC (the watch limit)."""
        libc = _libc()
        if not hasattr(libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "this C library has no inotify")
        fd = _check(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        try:
            wd = _check(
                libc.inotify_add_watch(fd, os.fsencode(path), mask | IN_ONLYDIR),
                "inotify_add_watch",
                path,
            )
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, wd)

    def read(self) -> list[Event]:
        """What has arrived; [] when nothing has (the descriptor does not block)."""
        try:
            return parse(os.read(self.fd, READ_SIZE))
        except BlockingIOError:
            return []

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
