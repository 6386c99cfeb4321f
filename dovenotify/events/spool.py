"""The event spool: where the Lua driver appends events for the service to read.

The driver appends each transaction's lines (the same format as on the socket,
one write) to a file of its own uid in the spool directory, `<event_spool>/<uid>`;
the event socket is its fallback (with older drivers, the other way round). The
service owns the directory, mode 3733: any uid may create its file there (the
driver runs as the mail uid, or as each user's own uid with system users), but
nobody may list it or remove another's file (sticky); new files get the service's
group (setgid), and a default ACL gives them mode 0640 whatever Dovecot's umask,
so only the writer appends and only the service reads. The service attributes a
file's lines to the file's owner, under the same rule as on the event socket
(peers.py).

Reading (push/spooling.py, spooltail.py): the service follows each file as it
grows, from where it left off, and now and then renames it aside
(`<uid>.draining`), waits for a writer that opened it just before to finish its
one append, reads the rest and removes it. It reads in bounded chunks, each line
handled as it is read, so memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs

from dovenotify.core.directories import make_dirs

DIR_MODE = 0o3733
CHUNK = 64 * 1024
DRAINING = ".draining"
# ACL entries (tag, permissions): owner rw, group r, others nothing; xattr format
# of <linux/posix_acl_xattr.h>, version 2.
_DEFAULT_ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((0x01, 6), (0x04, 4), (0x20, 0))
)


def legacy(path: Path) -> Path:
    """Where an older dovenotify's single spool file (mode 0622) is moved to be drained."""
    return path.with_name(path.name + ".old")


def create(path: Path) -> str | None:
    """Make the spool directory with the owner and modes its writers need.

    Returns a problem that leaves it usable but not for every writer: no ACLs here.
    """
    if path.is_file() and not path.is_symlink():
        os.replace(path, legacy(path))
    # Mail uids must reach the spool; what else is beside it (the database) they
    # may not list or read: 0711, on what is made here (umask 077 would say 0700).
    make_dirs(path.parent, 0o711)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(f"{path} is not a directory of dovenotify's user")
    os.chmod(path, DIR_MODE)
    try:
        os.setxattr(path, "system.posix_acl_default", _DEFAULT_ACL)
    except OSError as e:
        return (
            f"cannot give {path} a default ACL ({e.strerror}): files Dovecot's umask"
            " makes 0600 can be read only if dovenotify runs as root"
        )
    return None


def named_uid(name: str) -> int | None:
    """The uid a spool file's name claims (`1000`, `1000.draining`), if it claims one."""
    claimed = name.removesuffix(DRAINING)
    if claimed.isascii() and claimed.isdigit() and str(int(claimed)) == claimed:
        return int(claimed)
    return None


@attrs.frozen
class Spooled:
    """A spool file set aside for reading: its path, owner, and the uid its name claims."""

    path: Path
    uid: int
    gid: int
    named_uid: int | None

    @property
    def squatted(self) -> bool:
        """Made by another uid than the one it is named for, before that one did."""
        return self.named_uid is not None and self.named_uid != self.uid


def set_aside(path: Path) -> list[Spooled]:
    """Rename every non-empty spool file aside; return those (and any left by a crash)."""
    found = []
    for name in os.listdir(path):
        if not name.endswith(DRAINING):
            try:
                st = os.lstat(path / name)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                if not st.st_size:
                    continue
                os.rename(path / name, path / (name + DRAINING))
                name += DRAINING
        spooled = aside(path, name)
        if spooled is not None:
            found.append(spooled)
    return found


def aside(path: Path, name: str) -> Spooled | None:
    """Spool file `name`, set aside: a regular file, or None (whatever else was
    there is removed: nothing the driver makes, a hostile FIFO, link or directory)."""
    try:
        st = os.lstat(path / name)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        remove(path / name)
        return None
    return Spooled(path / name, st.st_uid, st.st_gid, named_uid(name))


def _open(path: Path) -> int:
    # O_NONBLOCK and O_NOFOLLOW: a FIFO or a link put in its place cannot hang or
    # redirect us; only a regular file is read.
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)


def chunks(path: Path, offset: int = 0, ino: int | None = None) -> Iterator[bytes]:
    """The file's bytes from `offset` (from 0 if it is not inode `ino`), a chunk at a
    time (the caller removes it after)."""
    fd = _open(path)
    with open(fd, "rb") as spooled:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if ino is None or st.st_ino == ino:
            spooled.seek(offset)
        while chunk := spooled.read(CHUNK):
            yield chunk


@attrs.frozen
class Seen:
    """One look at a spool file: what lstat/fstat said, and the bytes read at `start`."""

    name: str
    ino: int
    uid: int
    gid: int
    size: int
    regular: bool = True
    start: int = 0
    data: bytes = b""
    # Why it could not be read (its mode, where no default ACL gives us a say).
    problem: str | None = None

    @property
    def squatted(self) -> bool:
        """Not named for the uid that made it (before that uid did, or not a uid at all)."""
        return named_uid(self.name) != self.uid


def look(path: Path, name: str, known: tuple[int, int] | None, limit: int) -> Seen | None:
    """Look at spool file `name` and read up to `limit` bytes of it: from `known`'s
    offset if it is still inode `known`'s, else from 0. None: it is gone."""
    try:
        st = os.lstat(path / name)
        if stat.S_ISREG(st.st_mode):
            if known == (st.st_ino, st.st_size):
                return _seen(name, st, st.st_size)  # nothing new
            if named_uid(name) != st.st_uid:
                return _seen(name, st)  # nothing to read: it is to be removed
            try:
                fd = _open(path / name)
            except PermissionError as e:
                return _seen(name, st, problem=e.strerror or str(e))
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return _seen(name, st)
                # Shorter than read so far: its owner truncated it; from 0 again.
                same = known is not None and known[0] == st.st_ino and known[1] <= st.st_size
                start = known[1] if known is not None and same else 0
                data = os.pread(fd, limit, start) if start < st.st_size else b""
                return _seen(name, st, start, data)
            finally:
                os.close(fd)
        return _seen(name, st)
    except OSError:
        # Gone, or replaced by a link between lstat and open: whatever is there
        # now is seen at its own notice.
        return None


def _seen(
    name: str, st: os.stat_result, start: int = 0, data: bytes = b"", problem: str | None = None
) -> Seen:
    regular = stat.S_ISREG(st.st_mode)
    return Seen(name, st.st_ino, st.st_uid, st.st_gid, st.st_size, regular, start, data, problem)


def look_all(
    path: Path, wanted: list[tuple[str, tuple[int, int] | None]], limit: int
) -> list[tuple[str, Seen | None]]:
    """`look` at several files in one go (one hand-off to a thread for them all)."""
    return [(name, look(path, name, known, limit)) for name, known in wanted]


def remove(path: Path) -> None:
    """Remove what is at `path`, a hostile directory or FIFO included; gone is fine."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(path)
