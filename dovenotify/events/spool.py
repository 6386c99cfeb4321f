"""The event spool: the files the Lua driver appends each transaction's events to.

The service owns the directory (mode 0711: nobody else may list it or make
anything in it) and one file per uid that sends events, `<event_spool>/<uid>`,
which it makes itself, owned by it and appendable by that uid alone (an access
ACL, user:<uid>:-w-): what is in a file was written by its uid. A uid without a
file yet sends over the event socket, and the service makes its file then. So
no other account can plant a file, link or FIFO where a mail process writes.

Files an older dovenotify let their writers make (the directory was then
world-writable) are read once, under the rules they were written under, and
removed.

Reading (push/spooling.py, spooltail.py): the service follows each file as it
grows, from where it left off, and now and then rotates it: links it aside
(`<uid>.draining`) and renames a fresh file into its place, so a writer always
finds one; the one aside is read to its end after a grace period (for a writer
that opened it just before) and removed. It reads in bounded chunks, each line
handled as it is read, so memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs

from dovenotify.core.directories import make_dirs

DIR_MODE = 0o711
CHUNK = 64 * 1024
DRAINING = ".draining"
# Made aside, given its ACL, then renamed into place: never seen without it.
NEW = ".new"
# ACL tags of <linux/posix_acl_xattr.h>.
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def legacy(path: Path) -> Path:
    """Where an older dovenotify's single spool file (mode 0622) is moved to be drained."""
    return path.with_name(path.name + ".old")


def create(path: Path) -> str | None:
    """Make the spool directory, mode 0711, owned by the service's user.

    Returns a problem that leaves it usable but slower: no ACLs here, so mail
    processes cannot have files of their own and send over the event socket.
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
    # An older dovenotify's, for files its writers made.
    with contextlib.suppress(OSError):
        os.removexattr(path, "system.posix_acl_default")
    try:
        # The ACL of mode 0711 changes nothing, but fails where ACLs do.
        os.setxattr(
            path, "system.posix_acl_access", _acl((USER_OBJ, 7), (GROUP_OBJ, 1), (OTHER, 1))
        )
    except OSError as e:
        return (
            f"cannot set ACLs in {path} ({e.strerror}): mail processes cannot have"
            " spool files of their own, so their events come over the event socket,"
            " which costs each delivery more"
        )
    return None


def _acl(*entries: tuple[int, int], user: int | None = None) -> bytes:
    """An ACL in xattr format, version 2: (tag, permissions) entries in tag order,
    with a write-only entry for a named `user` after the owner's."""
    packed = [struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries]
    if user is not None:
        packed.insert(1, struct.pack("<HHI", USER, 2, user))
    return struct.pack("<I", 2) + b"".join(packed)


def file_of(path: Path, uid: int) -> Path:
    return path / str(uid)


def aside_path(path: Path, name: str) -> Path:
    """Where spool file `name` is set aside to be read to its end."""
    return path / (name + DRAINING)


def provide(path: Path, uid: int) -> Path:
    """`uid`'s file in the spool, made if missing (see `fresh`)."""
    target = file_of(path, uid)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            return target
        aside = aside_path(path, target.name)
        if stat.S_ISREG(st.st_mode) and not os.path.lexists(aside):
            # An older dovenotify's writer made it: read once, as what a crash left.
            os.rename(target, aside)
    os.replace(fresh(path, uid), target)
    return target


def fresh(path: Path, uid: int) -> Path:
    """An empty file aside that becomes `uid`'s when renamed to its name: owned by
    the service, appendable by `uid` alone (owner rw, user:uid w, mask w)."""
    new = path / f"{uid}{NEW}"
    new.unlink(missing_ok=True)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        acl = _acl((USER_OBJ, 6), (GROUP_OBJ, 0), (MASK, 2), (OTHER, 0), user=uid)
        os.setxattr(fd, "system.posix_acl_access", acl)
    except OSError:
        new.unlink()
        raise
    finally:
        os.close(fd)
    return new


def appendable(path: Path, uid: int) -> bool:
    """Whether `uid` may append to the spool file at `path`, as `fresh` makes them."""
    if uid == 0:
        return True
    st = os.lstat(path)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    try:
        acl = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except OSError:
        return False
    entries = {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", acl[4:])}
    mask = entries.get((MASK, 0xFFFFFFFF), 7)
    return bool(entries.get((USER, uid), 0) & mask & 2)


def rotate(path: Path, uid: int) -> Path:
    """Put a fresh file in place of `uid`'s; return the old one, linked aside, to be
    read once more when writers that opened it just before are done."""
    target = file_of(path, uid)
    aside = aside_path(path, target.name)
    aside.unlink(missing_ok=True)
    os.link(target, aside)
    os.replace(fresh(path, uid), target)
    return aside


def named_uid(name: str) -> int | None:
    """The uid a spool file's name claims (`1000`, `1000.draining`), if it claims one."""
    claimed = name.removesuffix(DRAINING)
    if claimed.isascii() and claimed.isdigit() and str(int(claimed)) == claimed:
        return int(claimed)
    return None


def writer(name: str, st: os.stat_result) -> tuple[int, int]:
    """Whose lines a spool file holds, (uid, gid): the uid it is named for when the
    service made it, else (an older dovenotify's, or a hostile file) its owner."""
    named = named_uid(name)
    if named is None or st.st_uid != os.geteuid():
        return st.st_uid, st.st_gid
    return named, primary_gid(named)


# Asked at every look at a file: the user database may be LDAP, not a local file.
@functools.lru_cache(maxsize=4096)
def primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return -1


def ours(name: str) -> bool:
    """A name the service gives files it is making or setting aside, never a writer's."""
    return name.endswith((DRAINING, NEW))


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
    """Set every non-empty spool file aside; return those (and any left by a crash)."""
    found = []
    for name in os.listdir(path):
        if name.endswith(NEW):
            # Made by a `fresh` that a crash cut short.
            remove(path / name)
            continue
        if not name.endswith(DRAINING):
            try:
                st = os.lstat(path / name)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                if not st.st_size:
                    continue
                move_aside(path, name, st)
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
    return Spooled(path / name, *writer(name, st), named_uid(name))


def move_aside(path: Path, name: str, st: os.stat_result | None = None) -> None:
    """Set file `name` aside as `<name>.draining`: one the service made gets a fresh
    file in its place (`rotate`), so its writer keeps appending; another's is moved."""
    st = st or os.lstat(path / name)
    uid = named_uid(name)
    if uid is not None and st.st_uid == os.geteuid():
        rotate(path, uid)
    else:
        os.rename(path / name, aside_path(path, name))


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
    # Why it could not be read (a file an older dovenotify's writer made 0600).
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
            if named_uid(name) != writer(name, st)[0]:
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
    uid, gid = writer(name, st)
    return Seen(name, st.st_ino, uid, gid, st.st_size, regular, start, data, problem)


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
