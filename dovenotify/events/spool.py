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

Rotation: a file is linked aside and a fresh one renamed into its place, so a
writer always finds one; the old one is read again after a grace period, for a
writer that opened it just before.
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
    st = os.lstat(path)
    if st.st_uid == uid or uid == 0:
        return uid == 0 or bool(st.st_mode & stat.S_IWUSR)
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
    aside = path / f"{uid}{DRAINING}"
    aside.unlink(missing_ok=True)
    os.link(target, aside)
    os.replace(fresh(path, uid), target)
    return aside


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
    with os.scandir(path) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                # Nothing the driver makes: a hostile FIFO, link or directory.
                with contextlib.suppress(OSError):
                    (os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink)(entry.path)
                continue
            name = entry.name
            if not name.endswith(DRAINING):
                if st.st_size == 0:
                    continue
                os.rename(entry.path, entry.path + DRAINING)
                name += DRAINING
            claimed = name.removesuffix(DRAINING)
            named_uid = int(claimed) if claimed.isascii() and claimed.isdigit() else None
            found.append(Spooled(path / name, st.st_uid, st.st_gid, named_uid))
    return found


def chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, a chunk at a time (the caller removes it after)."""
    # O_NONBLOCK and O_NOFOLLOW: a FIFO or a link put in its place cannot hang or
    # redirect us; only a regular file is read.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with open(fd, "rb") as spooled:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        while chunk := spooled.read(CHUNK):
            yield chunk
