"""Reading the event spool live: the trio shell around events/spooltail.py.

A watch on the spool directory (inotify; where it cannot be had, a look every
POLL_INTERVAL) says which file a writer has just appended to or made; each is read
from where it left off, at most PASS_BYTES per file per pass, and its lines are
handled as the event socket's are, with the rights of the file's owner. A file
read to its end is set aside (`<uid>.draining`) when big or quiet, read to its end
again SPOOL_GRACE later (a writer that opened it just before has appended by
then) and removed. At start, what is left in the spool (files written while the
service was away, or set aside by a crash) is read whole, as late events, each
distinct line once. A full rescan runs at start and every RESCAN_INTERVAL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
from pathlib import Path

import attrs
import trio

from dovenotify.core import inotify
from dovenotify.events import spool
from dovenotify.events.decoder import BadLine, Event, EventDecoder
from dovenotify.events.peers import Peer, Sender
from dovenotify.events.spooltail import PASS_BYTES, ROTATE_BYTES, SpoolTail, Tail
from dovenotify.push.intake import Intake
from dovenotify.push.tally import Quiet, Tally

log = logging.getLogger("dovenotify")

# Time for a writer that opened a file just before it was set aside to finish its append.
SPOOL_GRACE = 0.5
# Without inotify: how often the spool is looked at.
POLL_INTERVAL = 0.5
# With it: how often everything is looked at all the same (a missed event costs this).
RESCAN_INTERVAL = 30.0
# Distinct lines remembered while reading what was left at start, to handle each once.
SPOOL_DISTINCT = 10000
# A file made by one uid under another's name pushes that uid's devices at most
# this often: a squatter in a loop must not become a flood of pushes to its victim.
SQUAT_PUSH_WINDOW = 10.0
WATCH_MASK = inotify.IN_CLOSE_WRITE | inotify.IN_CREATE | inotify.IN_MOVED_TO


@attrs.define
class _Life:
    """One spool file's writer, and what its lines brought (logged once, at its end)."""

    sender: Sender
    tally: Tally


@attrs.define
class SpoolReader:
    intake: Intake
    tail: SpoolTail = attrs.field(init=False)
    _lives: dict[str, _Life] = attrs.field(factory=dict)
    _squats: Quiet = attrs.field(factory=lambda: Quiet(SQUAT_PUSH_WINDOW))
    _problem: str | None = None

    def __attrs_post_init__(self) -> None:
        config = self.intake.config
        # A small event_spool_size (the driver stops there) sets files aside sooner.
        rotate = min(ROTATE_BYTES, config.event_spool_size // 2)
        budget = self._budget()
        self.tail = SpoolTail(config.event_line_max, budget, rotate_bytes=rotate)

    @property
    def path(self) -> Path:
        return self.intake.config.event_spool

    def _budget(self) -> int:
        # The driver stops at event_spool_size; a uid writing its file itself may
        # not, and is read no further than the driver would have written.
        return self.intake.config.event_spool_size + self.intake.config.event_line_max

    async def run(self) -> None:
        # Files for the uids that may write for anyone (Dovecot's mail uid): their
        # first delivery appends too. Other uids get theirs at their first event.
        for uid in sorted(self.intake.event_policy.privileged.uids):
            self.intake.give_spool_file(uid)
        watch = self._watch()
        try:
            await self._read_left()
            async with trio.open_nursery() as nursery:
                await self._follow(watch, nursery)
        finally:
            if watch is not None:
                watch.close()

    def _watch(self) -> inotify.Watch | None:
        try:
            return inotify.Watch.open(self.path, WATCH_MASK)
        except OSError as e:
            log.warning(
                "cannot watch the event spool %s for changes (%s): looking at it every"
                " %g s instead, so spooled events are pushed up to that much later",
                self.path,
                inotify.cause(e),
                POLL_INTERVAL,
            )
            return None

    async def _follow(self, watch: inotify.Watch | None, nursery: trio.Nursery) -> None:
        names: set[str] = set()
        rescan_at = trio.current_time()
        while True:
            if trio.current_time() >= rescan_at:
                names |= await self._rescan(nursery)
                rescan_at = trio.current_time() + (RESCAN_INTERVAL if watch else POLL_INTERVAL)
            names.update(self.tail.unread())
            if names:
                await self._visit(sorted(names))
                names.clear()
            for name in self.tail.due(trio.current_time()):
                await self._rotate(name, nursery)
            if self.tail.unread():
                await trio.lowlevel.checkpoint()
                continue
            deadline = min(rescan_at, self.tail.next_due() or math.inf)
            if watch is None:
                await trio.sleep_until(deadline)
                continue
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(watch.fd)
            for event in watch.read():
                if event.mask & inotify.IN_Q_OVERFLOW:
                    rescan_at = trio.current_time()  # events were lost: look at all
                elif event.mask & inotify.IN_IGNORED:
                    # The directory itself went away (or its file system).
                    log.warning(
                        "the event spool %s is no longer watched: looking at it every %g s",
                        self.path,
                        POLL_INTERVAL,
                    )
                    watch.close()
                    watch = None
                    rescan_at = trio.current_time()
                    break
                elif self.tail.wanted(event.name):
                    names.add(event.name)

    async def _rescan(self, nursery: trio.Nursery) -> set[str]:
        try:
            found = await trio.to_thread.run_sync(os.listdir, self.path)
            self._problem = None
        except OSError as e:
            self._cannot_read(e)
            return set()
        for name in found:
            base = name.removesuffix(spool.DRAINING)
            if name != base and base not in self.tail.draining:
                # Not set aside by this process: by one that crashed, or by an older
                # dovenotify's writer. Its name is not set aside again while it is read.
                self.tail.draining.add(base)
                nursery.start_soon(self._drain_foreign, name)
        return {name for name in found if self.tail.wanted(name)} | set(self.tail.tails)

    def _cannot_read(self, e: OSError) -> None:
        if str(e) != self._problem:  # once, not at every look
            self._problem = str(e)
            log.warning("cannot read the event spool %s: %s", self.path, e)

    async def _visit(self, names: list[str]) -> None:
        wanted = [(name, self.tail.known(name)) for name in names]
        # Not in a thread: bytes a writer has just written into our own directory are
        # in the page cache, and a hand-off to a thread cost more than the calls
        # (scripts/bench_latency.py: service CPU per line ~0.9 of the event socket's
        # this way, ~1.3 with one thread hand-off per look).
        looked = spool.look_all(self.path, wanted, PASS_BYTES)
        now = trio.current_time()
        for name, seen in looked:
            step = self.tail.took(name, seen, now)
            if step.ended is not None:
                self._end(self._lives.pop(name), step.ended)
            if step.remove:
                await trio.to_thread.run_sync(spool.remove, self.path / name)
            if step.squatted is not None and self._squats.loud(step.squatted):
                named = self._named(step.squatted)
                if named.any_user or named.own is not None:  # else it has nobody to push
                    await self.intake.push_everyone(named)
            if step.problem is not None and self.intake.quiet.loud(spool.named_uid(name) or -1):
                log.warning(
                    "cannot read the spool file %s (%s): its events are not pushed;"
                    " an older dovenotify let its writer make it, and only root can read"
                    " what Dovecot's umask makes 0600",
                    self.path / name,
                    step.problem,
                )
            if step.tail is None:
                continue
            life = self._lives.get(name)
            if life is None:
                life = self._lives[name] = self._life(step.tail.uid, step.tail.gid)
            await self._handle(step.items, life, late=False)
            if step.overflow:
                del self._lives[name]
                await self._overflowed(life.sender)
                self._end(life, step.tail)

    def _named(self, uid: int) -> Sender:
        """Who a spool file's name says wrote it (its uid's own group, if it has one)."""
        return self.intake.event_policy.sender(Peer(0, uid, spool.primary_gid(uid)))

    def _life(self, uid: int, gid: int) -> _Life:
        sender = self.intake.event_policy.sender(Peer(0, uid, gid))
        return _Life(sender, Tally(functools.partial(self.intake.quiet.loud, uid)))

    async def _handle(self, items: list[Event | BadLine], life: _Life, *, late: bool) -> None:
        for item in items:
            await self.intake.handle_item(item, life.sender, life.tally, late=late, spooled=True)

    def _end(self, life: _Life, tail: Tail) -> None:
        log.debug("read %d event line(s) live from %s", life.tally.lines, tail.name)
        life.tally.report(life.sender)

    async def _rotate(self, name: str, nursery: trio.Nursery) -> None:
        tail = self.tail.rotate(name)
        life = self._lives.pop(name)
        try:
            await trio.to_thread.run_sync(spool.move_aside, self.path, name)
        except OSError:
            # Its owner removed it: all there was is read.
            self.tail.rotated(name)
            self._end(life, tail)
            return
        nursery.start_soon(self._finish_rotation, tail, life)

    async def _finish_rotation(self, tail: Tail, life: _Life) -> None:
        await trio.sleep(SPOOL_GRACE)
        where = (tail.offset, tail.ino)
        await self._read_aside(
            spool.aside_path(self.path, tail.name), life, tail.decoder, tail.budget, where
        )
        self.tail.rotated(tail.name)
        self._end(life, tail)

    async def _drain_foreign(self, name: str) -> None:
        try:
            found = await trio.to_thread.run_sync(spool.aside, self.path, name)
            if found is not None:
                await self._drain_aside(found)
        except OSError as e:
            self._cannot_read(e)
        finally:
            self.tail.rotated(name.removesuffix(spool.DRAINING))

    async def _read_left(self) -> None:
        """What the spool holds at start: written while we were away, or cut short."""
        old = spool.legacy(self.path)
        if old.exists():
            # An older dovenotify's single file, written as the mail uid.
            await self._drain_aside(spool.Spooled(old, 0, 0, None))
        try:
            found = await trio.to_thread.run_sync(spool.set_aside, self.path)
        except OSError as e:
            self._cannot_read(e)
            return
        if found:
            # A writer that opened a file just before it was renamed finishes its append.
            await trio.sleep(SPOOL_GRACE)
        for spooled in found:
            await self._drain_aside(spooled)

    async def _drain_aside(self, spooled: spool.Spooled) -> None:
        """Read a file set aside by a crash or at start: late events, once each."""
        if spooled.squatted:
            # Another uid made the file first: its lines may be anyone's, and the
            # uid it is named for may have lost its own.
            await self.intake.push_everyone(self._named(spooled.named_uid or 0))
            await trio.to_thread.run_sync(spool.remove, spooled.path)
            return
        sender = self.intake.event_policy.sender(Peer(0, spooled.uid, spooled.gid))
        life = _Life(sender, Tally())
        decoder = EventDecoder(self.intake.config.event_line_max)
        await self._read_aside(spooled.path, life, decoder, self._budget(), None)
        log.info(
            "%d event line(s) from the spool of %s, made while dovenotify was away",
            life.tally.lines,
            sender.describe(),
        )
        life.tally.report(sender)

    async def _read_aside(
        self,
        path: Path,
        life: _Life,
        decoder: EventDecoder,
        budget: int,
        where: tuple[int, int] | None,
    ) -> None:
        """Read `path` from `where` (offset, inode) to its end, then remove it. From
        the start (`where` None), its events are late and each distinct one counts
        once: lines repeat (a user's INBOX, delivery after delivery)."""
        late = where is None
        seen: dict[Event | BadLine, None] = {}
        try:
            offset, ino = where or (0, None)
            with contextlib.closing(spool.chunks(path, offset, ino)) as chunks:
                while budget > 0 and (chunk := await trio.to_thread.run_sync(next, chunks, b"")):
                    budget -= len(chunk)
                    items = decoder.feed(chunk)
                    if late:
                        items = _distinct(items, seen)
                    await self._handle(items, life, late=late)
        except OSError as e:
            log.warning("cannot read the spooled events in %s: %s", path, e)
        await trio.to_thread.run_sync(spool.remove, path)
        if budget <= 0:
            await self._overflowed(life.sender)
        else:
            await self._handle(decoder.close(), life, late=late)

    async def _overflowed(self, sender: Sender) -> None:
        log.warning(
            "the spool of %s is bigger than event_spool_size (%d bytes): the rest of it"
            " is not read",
            sender.describe(),
            self.intake.config.event_spool_size,
        )
        await self.intake.push_everyone(sender)


def _distinct(
    items: list[Event | BadLine], seen: dict[Event | BadLine, None]
) -> list[Event | BadLine]:
    """Those of `items` not in `seen` (which remembers a bounded number of them)."""
    fresh = []
    for item in items:
        if item in seen:
            continue
        if len(seen) >= SPOOL_DISTINCT:
            seen.clear()
        seen[item] = None
        fresh.append(item)
    return fresh
