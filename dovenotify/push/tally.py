"""What one event connection or spool file brought, told in the log once, not per line.

A peer that misbehaves in a loop (a new connection each time) gets its problems
logged once a minute (`Quiet`); within one connection, the first bad lines are
logged and the rest counted (`Tally`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from dovenotify.events.peers import Sender

log = logging.getLogger("dovenotify")

# Bad lines logged per connection or spool file; the rest are counted.
LOGGED_BAD_LINES = 10


@attrs.define
class Tally:
    """What one event connection or spool file brought, for one line in the log."""

    # Asked at the first problem: False if this sender's problems were logged
    # within the minute, so not again yet.
    may_log: Callable[[], bool] = lambda: True
    _loud: bool | None = None
    lines: int = 0
    bad: int = 0
    refused: dict[str, None] = attrs.field(factory=dict)
    refused_count: int = 0

    def refuse(self, username: str) -> None:
        self.refused_count += 1
        if len(self.refused) < 3:
            self.refused[username] = None

    @property
    def loud(self) -> bool:
        if self._loud is None:
            self._loud = self.may_log()
        return self._loud

    def report(self, sender: Sender) -> None:
        if not (self.bad or self.refused_count) or not self.loud:
            return
        if self.bad > LOGGED_BAD_LINES:
            log.warning(
                "skipped %d more bad event lines from %s",
                self.bad - LOGGED_BAD_LINES,
                sender.describe(),
            )
        if self.refused_count:
            log.warning(
                "refused %d event(s) from %s for other users (%s): a uid that is not"
                " root, Dovecot's mail_uid or in event_peers may send events only for"
                " its own user",
                self.refused_count,
                sender.describe(),
                ", ".join(self.refused),
            )


@attrs.define
class Quiet:
    """Whose problems were logged lately: a peer that misbehaves in a loop (a new
    connection each time) gets its lines in the log once a minute, not each time."""

    window: float = 60.0
    _last: dict[int, float] = attrs.field(factory=dict)

    def loud(self, uid: int) -> bool:
        now = trio.current_time()
        last = self._last.get(uid)
        if last is not None and now - last < self.window:
            return False
        if len(self._last) > 10000:  # uids are few; bounded all the same
            self._last.clear()
        self._last[uid] = now
        return True
