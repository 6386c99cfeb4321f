"""Who is on the other end of a unix socket, and whether they may talk to us.

The kernel tells (SO_PEERCRED): the uid and gid of the process that connected,
which it cannot forge. Root may always connect.
"""

from __future__ import annotations

import grp
import pwd
import socket
import struct

import attrs


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
    def parse(cls, entries: tuple[str, ...]) -> PeerRule:
        """`vmail`, `5000` (users, uids), `@mail`, `@8` (groups, gids).

        A name that does not exist here is an error: a rule that silently allows
        nobody would drop every event.
        """
        uids, gids = {0}, set()
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
