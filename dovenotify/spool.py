"""The event spool: where the Lua driver keeps events it could not send.

When the service is stopped, hung or its socket is missing, the driver appends
the transaction's lines (the same format as on the socket) to a file of its own
uid in the spool directory, `<event_spool>/<uid>`. The service owns the directory,
mode 3733: any uid may create its file there (the driver runs as the mail uid,
or as each user's own uid with system users), but nobody may list it or remove
another's file (sticky); new files get the service's group (setgid), and a
default ACL gives them mode 0640 whatever Dovecot's umask, so only the writer
appends and only the service reads. The service attributes a file's lines to
the file's owner, under the same rule as on the event socket (peers.py).

Draining: the service renames a file aside (it owns the directory), waits for a
writer that opened it just before to finish its one append, then reads it in
chunks, each line handled as it is read, so memory does not grow with the file.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import attrs

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


def make_dirs(path: Path, mode: int) -> None:
    """`mkdir -p`, giving the directories it makes `mode` whatever the umask."""
    if path.is_dir():
        return
    make_dirs(path.parent, mode)
    with contextlib.suppress(FileExistsError):
        path.mkdir()
        path.chmod(mode)


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
