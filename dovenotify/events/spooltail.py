"""Following the spool's files as they grow (sans-I/O: looks in, steps out).

Per file name (one per writing uid), a `Tail`: the file's inode, how far it has
been read, and the decoder holding its partial last line, so each line is handled
once, when it is complete. `SpoolTail.took` takes one look at a file
(`spool.Seen`, with the bytes read) and says what to do: the lines to handle, a
file to remove (not a regular file, or not named for the uid that made it), a
life that ended (a new inode took the name, or the file is gone). `due` says which
files to set aside (rotate): read to the end, and big or quiet for a while.
"""

from __future__ import annotations

import attrs

from dovenotify.events.decoder import BadLine, Event, EventDecoder
from dovenotify.events.spool import Seen, named_uid, ours

# Read per file per pass: one busy or hostile file cannot starve the others.
PASS_BYTES = 64 * 1024
# A file read to its end is set aside once it is this big, or this quiet: files
# stay small, and a restart re-reads little.
ROTATE_BYTES = 64 * 1024
ROTATE_QUIET = 10.0


@attrs.define
class Tail:
    """One life of one spool file (an inode under its name)."""

    name: str
    ino: int
    uid: int
    gid: int
    decoder: EventDecoder
    # Bytes this life may still be read (event_spool_size + event_line_max).
    budget: int
    offset: int = 0
    size: int = 0  # as last seen
    grew: float = 0.0  # when it was last seen growing

    @property
    def read_out(self) -> bool:
        return self.offset >= self.size

    def feed(self, data: bytes) -> list[Event | BadLine]:
        self.offset += len(data)
        self.budget -= len(data)
        return self.decoder.feed(data)


@attrs.frozen
class Step:
    """What one look at a file asks for."""

    # Remove it: not a regular file, or not named for the uid that made it.
    remove: bool = False
    # Whose devices to push: the uid it is named for, when another made it.
    squatted: int | None = None
    # A life that ended here: its lines are all handled (tell its tally).
    ended: Tail | None = None
    # The life read now (new when it is not the one before), and its new lines.
    tail: Tail | None = None
    items: list[Event | BadLine] = attrs.field(factory=list)
    # This life was read as far as it may be: push everyone, remove the file.
    overflow: bool = False
    # It cannot be read: left alone (the driver fills it, then uses the socket).
    problem: str | None = None


@attrs.define
class SpoolTail:
    line_max: int
    budget: int
    rotate_bytes: int = ROTATE_BYTES
    quiet: float = ROTATE_QUIET
    tails: dict[str, Tail] = attrs.field(factory=dict)
    # Names set aside (`<name>.draining`) and not read to the end yet.
    draining: set[str] = attrs.field(factory=set)

    def known(self, name: str) -> tuple[int, int] | None:
        """(inode, offset) of the life being read under `name`, for `spool.look`."""
        tail = self.tails.get(name)
        return None if tail is None else (tail.ino, tail.offset)

    @staticmethod
    def wanted(name: str) -> bool:
        """A name to follow live: not one the service is making or has set aside."""
        return not ours(name)

    def took(self, name: str, seen: Seen | None, now: float) -> Step:
        old = self.tails.get(name)
        if seen is None:
            self.tails.pop(name, None)
            return Step(ended=old)
        if not seen.regular or seen.squatted:
            self.tails.pop(name, None)
            squatter = named_uid(name) if seen.regular else None
            return Step(remove=True, squatted=squatter, ended=old)
        if seen.problem is not None:
            self.tails.pop(name, None)
            return Step(ended=old, problem=seen.problem)
        ended = None
        tail = old
        if old is None or old.ino != seen.ino or seen.start != old.offset:
            # A new file under this name (or its owner truncated it): from 0.
            ended = old
            decoder = EventDecoder(self.line_max)
            tail = Tail(name, seen.ino, seen.uid, seen.gid, decoder, self.budget, grew=now)
            self.tails[name] = tail
        assert tail is not None
        size = max(seen.size, seen.start + len(seen.data))
        if size > tail.size:
            tail.grew = now
        tail.size = size
        items = tail.feed(seen.data[: max(tail.budget, 0)])
        if tail.budget <= 0 and not tail.read_out:
            del self.tails[name]
            return Step(remove=True, ended=ended, tail=tail, items=items, overflow=True)
        return Step(ended=ended, tail=tail, items=items)

    def unread(self) -> list[str]:
        """Names with bytes not read yet (a pass reads at most PASS_BYTES of each)."""
        return [name for name, tail in self.tails.items() if not tail.read_out]

    def due(self, now: float) -> list[str]:
        """Names to set aside now: read to the end, and big or quiet."""
        return [
            name
            for name, tail in self.tails.items()
            if tail.read_out
            and name not in self.draining
            and (tail.offset >= self.rotate_bytes or now - tail.grew >= self.quiet)
        ]

    def next_due(self) -> float | None:
        """When the next quiet file is due to be set aside."""
        times = [
            tail.grew + self.quiet
            for name, tail in self.tails.items()
            if tail.read_out and name not in self.draining
        ]
        return min(times, default=None)

    def rotate(self, name: str) -> Tail:
        """`name` is being renamed aside: its tail leaves, until `rotated(name)`."""
        self.draining.add(name)
        return self.tails.pop(name)

    def rotated(self, name: str) -> None:
        self.draining.discard(name)
