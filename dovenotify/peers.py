"""Who is on the other end of a socket, and for which users they may send events.

The kernel tells who connected: SO_PEERCRED on a unix socket, the owner of the
connection in /proc/net/tcp{,6} on loopback TCP; neither can be forged. Root,
Dovecot's mail uid and the configured `event_peers` may send events for anyone:
Dovecot runs every virtual user's mail as that uid. Any other uid may send events
only for the user whose account it is, as Dovecot does with system users (each
user's mail runs as that user's uid), so a local account can push nobody else.
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import pwd
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs

log = logging.getLogger("dovenotify")


@attrs.frozen
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", creds))


@attrs.frozen
class PeerRule:
    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def parse(cls, entries: tuple[str, ...], extra_uids: frozenset[int] = frozenset()) -> PeerRule:
        """`vmail`, `5000` (users, uids), `@mail`, `@8` (groups, gids).

        A name that does not exist here is an error: a rule that silently allows
        nobody would drop every event.
        """
        uids, gids = {0, *extra_uids}, set()
        for entry in entries:
            group = entry.startswith("@")
            name = entry[1:] if group else entry
            if name.isdigit():
                (gids if group else uids).add(int(name))
                continue
            try:
                if group:
                    gids.add(grp.getgrnam(name).gr_gid)
                else:
                    uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                kind = "group" if group else "user"
                raise ValueError(f"event_peers: there is no {kind} {name!r} here") from None
        return cls(frozenset(uids), frozenset(gids))

    def allows(self, peer: Peer) -> bool:
        return peer.uid in self.uids or peer.gid in self.gids

    def describe(self) -> str:
        users = [_user(u) for u in sorted(self.uids)]
        groups = [f"group {_group(g)}" for g in sorted(self.gids)]
        return ", ".join(users + groups)


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def account_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@attrs.frozen
class Sender:
    """A peer, and whose events it may send: anyone's (`own` None) or its own user's."""

    peer: Peer
    any_user: bool
    own: str | None

    def may_send_for(self, username: str, key: Callable[[str], str]) -> bool:
        """`key` makes user names comparable (username_format)."""
        return self.any_user or (self.own is not None and key(username) == key(self.own))

    def describe(self) -> str:
        """`pid 12 (uid 1000 (alice), gid 1000)`; a spool file's sender has no pid."""
        name = account_name(self.peer.uid)
        who = f"uid {self.peer.uid}" + (f" ({name})" if name else "")
        return f"pid {self.peer.pid} ({who}, gid {self.peer.gid})" if self.peer.pid else who


@attrs.frozen
class EventPolicy:
    privileged: PeerRule

    @classmethod
    def build(cls, event_peers: tuple[str, ...] | None) -> EventPolicy:
        return cls(PeerRule.parse(event_peers or (), dovecot_mail_uids()))

    def sender(self, peer: Peer) -> Sender:
        if self.privileged.allows(peer):
            return Sender(peer, True, None)
        return Sender(peer, False, account_name(peer.uid))


def dovecot_mail_uids() -> frozenset[int]:
    """Dovecot's mail_uid (virtual users' mail runs as it), if this host's Dovecot has one.

    Empty on Debian's default setup, where each user's mail runs as the user: then
    only root, event_peers and each user's own uid may send events.
    """
    try:
        found = subprocess.run(
            ["doveconf", "-h", "mail_uid"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError) as e:
        _unknown_mail_uid(str(e))
        return frozenset()
    if found.returncode != 0:
        _unknown_mail_uid((found.stderr.strip().splitlines() or ["no answer"])[-1])
        return frozenset()
    value = found.stdout.strip()
    if not value:
        return frozenset()
    if value.isdigit():
        return frozenset({int(value)})
    with contextlib.suppress(KeyError):
        return frozenset({pwd.getpwnam(value).pw_uid})
    log.warning("Dovecot's mail_uid %r is no user here; set event_peers to the mail user", value)
    return frozenset()


def _unknown_mail_uid(problem: str) -> None:
    log.warning(
        "cannot ask Dovecot for its mail_uid (%s): if Dovecot runs mail as one uid"
        " (say vmail), set event_peers: [vmail]; until then that uid may send events"
        " only for its own user",
        problem,
    )


# --- loopback TCP ---------------------------------------------------------------

PROC_NET_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))


def tcp_peer_uid(
    peer: tuple[str, int], local: tuple[str, int], tables: tuple[Path, ...] = PROC_NET_TCP
) -> int | None:
    """The uid owning the loopback TCP connection `peer` -> `local` (we are `local`)."""
    want = (_address(peer), _address(local))
    for table in tables:
        with contextlib.suppress(OSError):
            uid = find_tcp_uid(table.read_text(), want)
            if uid is not None:
                return uid
    return None


def find_tcp_uid(table: str, want: tuple[tuple[bytes, int], tuple[bytes, int]]) -> int | None:
    """In a /proc/net/tcp{,6} text: the uid of the socket at want[0] connected to want[1]."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            ends = (_kernel_address(fields[1]), _kernel_address(fields[2]))
        except ValueError:
            continue
        if ends == want:
            return int(fields[7])
    return None


def _address(end: tuple[str, int]) -> tuple[bytes, int]:
    """An address as 16 bytes (IPv4 mapped into IPv6) and a port."""
    ip = ipaddress.ip_address(end[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv4Address):
        ip = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return ip.packed, int(end[1])


def _kernel_address(text: str) -> tuple[bytes, int]:
    """`0100007F:2D8B` (tcp) or 32 hex digits (tcp6): 32-bit words in host byte order."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    words = raw
    if len(words) == 4:
        words = b"\0" * 10 + b"\xff\xff" + words
    if len(words) != 16:
        raise ValueError(text)
    return words, int(port, 16)
