"""The event spool: where the Lua driver keeps events it could not send.

When the service is stopped, hung or its socket is missing, the driver appends
the transaction's lines (the same format as on the socket) to one file. The
service creates that file at start, writable by anyone and readable by itself
only (0622), because the driver runs as the mail uid — or as each user's own uid
with system users. It drains the file at start and every few seconds after.

Draining never makes the file disappear, so a writer never finds it missing:
the current file is hard-linked aside, an empty one renamed over it, and the
aside copy read once writers that opened the old file just before have had time
to finish their one append.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dovenotify.events.decoder import BadLine, Event, EventDecoder

MODE = 0o622
# Spooled lines are read and decoded this much at a time: the events of one chunk
# take several times its size until the repeated ones are dropped.
CHUNK = 64 * 1024


def _aside(path: Path) -> Path:
    return path.with_name(path.name + ".draining")


def create(path: Path) -> None:
    """Make sure the spool exists with the mode writers need (whatever our umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, MODE)
    try:
        os.fchmod(fd, MODE)
    finally:
        os.close(fd)


def set_aside(path: Path) -> bool:
    """Move what the spool holds aside and leave an empty spool; False if it was empty.

    What an earlier drain set aside and did not read (a crash) is read first; the
    spool itself then waits for the next drain.
    """
    aside = _aside(path)
    if aside.exists():
        return True
    if path.stat().st_size == 0:
        return False
    fresh = path.with_name(path.name + ".new")
    with contextlib.suppress(FileNotFoundError):
        fresh.unlink()
    create(fresh)
    os.link(path, aside)
    os.replace(fresh, path)
    return True


def take_aside(path: Path) -> list[Event | BadLine]:
    """Read and remove what `set_aside` put aside: its lines decoded, each one once.

    Lines repeat (a user's INBOX, delivery after delivery), so the spool of a long
    outage holds few distinct lines among many: read in chunks, keeping only the
    distinct ones, memory follows the number of users, not the outage's length.
    """
    aside = _aside(path)
    try:
        spooled = aside.open("rb")
    except FileNotFoundError:
        return []
    decoder = EventDecoder()
    distinct: dict[Event | BadLine, None] = {}
    with spooled:
        while chunk := spooled.read(CHUNK):
            distinct.update(dict.fromkeys(decoder.feed(chunk)))
    distinct.update(dict.fromkeys(decoder.close()))
    aside.unlink()
    return list(distinct)
