"""The directories the service needs, checked at start so that a missing one is
named with the user who needs it, instead of SQLite's "unable to open database file".

The run directory (sockets) lives in /run, which is emptied at boot: systemd makes
it again (RuntimeDirectory=), supervisord does not, so the service makes it itself
when it is allowed to (as root, or where its user may write).
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path

from .config import Config, ConfigError

# As systemd's RuntimeDirectoryMode and StateDirectory: Dovecot's users must reach
# the sockets and the event spool inside.
RUN_MODE = 0o755


class DirectoryError(ConfigError):
    """A directory the service needs is missing or not writable by its user."""


def needed(config: Config) -> list[Path]:
    """Directories the service writes in, in the order it uses them."""
    paths = [config.event_socket.parent, config.relay_socket.parent, config.event_spool.parent]
    if "://" not in config.database:
        paths.insert(0, Path(config.database).parent)
    return list(dict.fromkeys(paths))


def check(config: Config) -> None:
    """Make what is missing when allowed to; otherwise raise DirectoryError saying
    which directory, for which user, and the fix."""
    problems = [p for p in (_problem(path) for path in needed(config)) if p]
    if problems:
        raise DirectoryError(
            "dovenotify cannot start: "
            + "; ".join(problems)
            + ". `dovenotify setup` makes them with the right owner and modes."
        )


def _problem(path: Path) -> str | None:
    if not path.is_dir():
        try:
            path.mkdir(parents=True)
            # Explicitly: the service runs with umask 077.
            path.chmod(RUN_MODE)
        except OSError as e:
            return (
                f"the directory {path} does not exist and {_me()} cannot create it "
                f"({e.strerror}): create it owned by {_me(name_only=True)} "
                f"(install -d -o {_me(name_only=True)} -m 0755 {path})"
            )
    if not os.access(path, os.W_OK | os.X_OK):
        return (
            f"{_me()} cannot write in {path} ({_owner(path)}): chown {_me(name_only=True)} {path}"
        )
    return None


def _me(*, name_only: bool = False) -> str:
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid) if name_only else f"uid {uid}"
    return name if name_only else f"user {name} (uid {uid})"


def _owner(path: Path) -> str:
    st = path.stat()
    return f"owned by {owner_names(st.st_uid, st.st_gid)}, mode {st.st_mode & 0o7777:04o}"


def owner_names(uid: int, gid: int) -> str:
    """`user:group`, with numbers for ids that have no name."""
    names = []
    for lookup, number in ((pwd.getpwuid, uid), (grp.getgrgid, gid)):
        try:
            names.append(lookup(number)[0])
        except KeyError:
            names.append(str(number))
    return ":".join(names)
