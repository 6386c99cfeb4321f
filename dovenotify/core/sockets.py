"""The unix sockets the service and the relay listen on, and telling systemd we are up."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import trio

from dovenotify.core.directories import make_dirs


def unix_listener(path: Path, mode: int) -> trio.SocketListener:
    # Anyone may reach the sockets; who may use them is checked by SO_PEERCRED.
    make_dirs(path.parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind the stdlib way: trio's bind is async only to resolve names.
    sock._sock.bind(str(path))  # type: ignore[attr-defined]
    os.chmod(path, mode)
    sock.listen(512)
    return trio.SocketListener(sock)


def socket_file(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` now (device, inode); None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_socket(path: Path, bound: tuple[int, int] | None) -> None:
    """Remove the socket file we bound, but not one bound at that path since: a
    `dovenotify relay` started before the inline relay it replaces has stopped."""
    if bound is not None and socket_file(path) == bound:
        with contextlib.suppress(OSError):
            path.unlink()


def notify_ready() -> None:
    """Tell systemd (Type=notify) or a test harness that we are up."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", address)
