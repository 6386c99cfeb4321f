"""Who may read the files the service reads (certificate, key, database).

Admin commands run as root, the service usually as its own user: a file written
by `cert import` or `import-xapsd` must stay readable by the service, or the next
reload fails with "Permission denied". A file that is replaced keeps the owner,
group and mode of the one it replaces, which the admin chose. A new file takes
the owner and group of its directory (set up for the service, e.g.
root:dovenotify /etc/dovenotify or dovenotify:dovenotify /var/lib/dovenotify)
and mode 0640; in a directory of root's it gets the service's group when that
group exists, else it stays root's alone (0600).
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import stat
from pathlib import Path

import attrs

SERVICE_GROUP = "dovenotify"


@attrs.frozen
class Ownership:
    uid: int
    gid: int
    mode: int

    def describe(self) -> str:
        return f"{_user_name(self.uid)}:{_group_name(self.gid)}, mode {self.mode:04o}"


def ownership_for(path: Path) -> Ownership:
    """What `path` should be owned by and its mode, were it (re)written now."""
    try:
        st = path.stat()
        return Ownership(st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
    except FileNotFoundError:
        pass
    directory = path.parent.stat()
    if directory.st_uid != 0 or directory.st_gid != 0:
        return Ownership(directory.st_uid, directory.st_gid, 0o640)
    try:
        return Ownership(0, grp.getgrnam(SERVICE_GROUP).gr_gid, 0o640)
    except KeyError:
        return Ownership(0, 0, 0o600)


def write(path: Path, data: bytes) -> Ownership:
    """Replace `path` with `data` in one rename, owned as `ownership_for` says.

    The temporary file is private until it has its final owner and mode, so the
    key is never readable by anyone it is not meant for.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    ownership = ownership_for(path)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
        _apply(fd, ownership)
    except BaseException:
        os.unlink(temporary)
        raise
    finally:
        os.close(fd)
    os.replace(temporary, path)
    return ownership


def adopt(path: Path, ownership: Ownership) -> None:
    """Give a file another command created (a new database) the chosen owner and mode."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        _apply(fd, ownership)
    finally:
        os.close(fd)


def _apply(fd: int, ownership: Ownership) -> None:
    # Only root may give a file away; anyone else keeps their own files, which is
    # what an unprivileged service running its own admin commands needs anyway.
    if os.geteuid() == 0:
        os.fchown(fd, ownership.uid, ownership.gid)
    os.fchmod(fd, ownership.mode)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
