"""The handoff from Dovecot's post-login helper: a hello line naming who logged in,
and the client's and Dovecot's descriptors, passed over the relay socket.

Only uids allowed by relay_peers may hand connections over (SO_PEERCRED).
"""

from __future__ import annotations

import array
import json
import logging
import os
import pwd
import socket
import struct

import attrs
import trio

log = logging.getLogger("dovenotify.relay")

HANDSHAKE_LIMIT = 4096


@attrs.frozen
class Handoff:
    """Who logged in, as the post-login helper tells it."""

    username: str
    ip: str


class DescriptorsLost(Exception):
    """A handoff arrived without its descriptors: this process has no room for them."""


async def receive_handoff(sock: trio.socket.SocketType) -> tuple[Handoff | None, list[int]]:
    fd_size = array.array("i").itemsize
    data, ancillary, flags, _addr = await sock.recvmsg(
        HANDSHAKE_LIMIT, socket.CMSG_SPACE(2 * fd_size)
    )
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % fd_size])
            fds.extend(received)
    if flags & socket.MSG_CTRUNC:
        # The kernel could not give us the descriptors (we are at our limit).
        for fd in fds:
            os.close(fd)
        raise DescriptorsLost
    try:
        if len(fds) != 2:
            raise ValueError(f"expected two file descriptors, got {len(fds)}")
        return parse_hello(data), fds
    except ValueError as e:
        log.warning("ignored a malformed relay handoff: %s", e)
        for fd in fds:
            os.close(fd)
        return None, []


def parse_hello(data: bytes) -> Handoff:
    """Who logged in, from the helper's hello line; ValueError naming what is wrong."""
    try:
        hello = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(hello, dict):
        raise ValueError("expected a JSON object")
    # `lookup` is the user_lookup field, empty when the user's userdb has none.
    username = hello.get("lookup") or hello.get("user")
    if not isinstance(username, str) or not username:
        raise ValueError("expected a user name")
    return Handoff(username=username, ip=str(hello.get("ip", "")))


def peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def allowed_uids(names: tuple[str, ...]) -> frozenset[int]:
    """Resolve user names to uids; names that do not exist on this host are skipped."""
    uids = set()
    for name in names:
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            if name.isdigit():
                uids.add(int(name))
    return frozenset(uids)
