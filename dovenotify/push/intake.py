"""Events from Dovecot, to pushes: the event socket, each line (socket or spool), who is told.

Each connection's sender is known by its uid (events/peers.py) and may send
events for its own user only, unless it is root, Dovecot's mail uid or in
event_peers; connections and lines are bounded. The spool's lines (spooling.py)
are handled here too, with the rights of each file's owner. Each event is
matched to the user's registrations and handed to the dispatcher, which says
which devices to push now; `Sending` takes them from there.
"""

from __future__ import annotations

import collections
import functools
import logging
import time

import attrs
import trio

from dovenotify.admin.metrics import Metrics
from dovenotify.core.config import Config
from dovenotify.core.listening import Acceptor
from dovenotify.core.usernames import UserKeys
from dovenotify.events import spool
from dovenotify.events.decoder import SPOOL_FULL, BadLine, Event, EventDecoder
from dovenotify.events.dispatch import Dispatcher
from dovenotify.events.peers import EventPolicy, PeerRule, Sender, peer_of
from dovenotify.push.sending import Sending
from dovenotify.push.tally import LOGGED_BAD_LINES, Quiet, Tally
from dovenotify.store.base import Store, StoreError, who
from dovenotify.store.expiry import unexpired

log = logging.getLogger("dovenotify")

# How long a connection past its uid's share (event_connections_per_uid) is read.
OVER_SHARE_SECONDS = 0.05


@attrs.define
class Intake:
    config: Config
    store: Store
    sending: Sending
    # The sending loop's own: what is held back here, it sends when due.
    dispatcher: Dispatcher = attrs.field(
        default=attrs.Factory(lambda self: self.sending.dispatcher, takes_self=True)
    )
    metrics: Metrics = attrs.field(
        default=attrs.Factory(lambda self: self.sending.metrics, takes_self=True)
    )
    usernames: UserKeys = attrs.field(factory=UserKeys)
    event_policy: EventPolicy = attrs.field(factory=lambda: EventPolicy(PeerRule.parse(())))
    # Whose problems were logged lately (the spool's readers share it).
    quiet: Quiet = attrs.field(factory=Quiet)
    # False where the spool cannot have files for mail uids (no ACLs, no directory):
    # the service said so once at start.
    spool_files: bool = True

    async def serve_events(self, listener: trio.SocketListener) -> None:
        config = self.config
        acceptor = Acceptor(listener, "event connections")
        # A semaphore, not a CapacityLimiter: the connection's task releases it.
        room = trio.Semaphore(config.event_connections)
        # Connections open per uid that is not a mail uid: held for up to
        # event_connection_seconds, and past those glimpsed for OVER_SHARE_SECONDS.
        held: collections.Counter[int] = collections.Counter()
        glimpsed: collections.Counter[int] = collections.Counter()
        crowded: set[int] = set()  # uids told about their share
        async with trio.open_nursery() as nursery:
            while True:
                await room.acquire()
                stream = await acceptor.accept()
                sender = self._event_sender(stream)
                if sender is None:
                    await stream.aclose()
                    room.release()
                    continue
                uid = sender.peer.uid
                # It sent here for want of a spool file, most likely.
                self.give_spool_file(uid)
                share = config.event_connections_per_uid
                if sender.any_user:
                    # Mail uids and root share the total.
                    nursery.start_soon(self._read_events, stream, sender, room, None)
                elif held[uid] < share:
                    crowded.discard(uid)
                    held[uid] += 1
                    nursery.start_soon(self._read_events, stream, sender, room, held)
                else:
                    # Past its share, a uid's connection takes no place of the total
                    # and is read only for what it has already sent (a driver's
                    # lines queued while we were busy): idle ones hold nothing.
                    room.release()
                    if uid not in crowded:
                        crowded.add(uid)
                        log.warning(
                            "%s has %d event connections open, all event_connections_per_uid"
                            " allows: more are read only for what they have already sent",
                            sender.describe(),
                            held[uid],
                        )
                    if glimpsed[uid] < share:
                        glimpsed[uid] += 1
                        nursery.start_soon(self._read_events, stream, sender, None, glimpsed)
                    else:
                        await stream.aclose()

    def give_spool_file(self, uid: int) -> None:
        """Make `uid` a spool file if it has none (a few system calls if it has)."""
        if not self.spool_files:
            return
        try:
            spool.provide(self.config.event_spool, uid)
        except OSError as e:
            if self.quiet.loud(uid):
                log.warning(
                    "cannot make uid %d a file in the event spool %s (%s): its events keep"
                    " coming over the event socket, which costs each delivery more",
                    uid,
                    self.config.event_spool,
                    e.strerror or e,
                )

    def _event_sender(self, stream: trio.SocketStream) -> Sender | None:
        try:
            peer = peer_of(stream.socket)  # type: ignore[arg-type]
        except OSError:
            return None
        sender = self.event_policy.sender(peer)
        if sender.any_user or sender.own is not None:
            return sender
        log.warning(
            "refused events from %s: that uid has no account here and is not one that"
            " may send events for any user (root, Dovecot's mail_uid, event_peers: %s)",
            sender.describe(),
            self.event_policy.privileged.describe(),
        )
        return None

    async def _read_events(
        self,
        stream: trio.SocketStream,
        sender: Sender,
        room: trio.Semaphore | None,
        per_uid: collections.Counter[int] | None,
    ) -> None:
        """Handle each line as it arrives, within the bounds on a connection; one
        without a `room` (past its uid's share) only for what it has already sent."""
        seconds = self.config.event_connection_seconds if room is not None else OVER_SHARE_SECONDS
        config = self.config
        decoder = EventDecoder(config.event_line_max)
        tally = Tally(functools.partial(self.quiet.loud, sender.peer.uid))
        problem = None
        # Only the peer's time is bounded: handling a line (the store) is ours.
        deadline = trio.current_time() + seconds
        try:
            async with stream:
                while True:
                    with trio.move_on_at(deadline) as timer:
                        data = await _receive(stream)
                    if timer.cancelled_caught:
                        problem = f"it was still open after {seconds:g} s"
                        if seconds == config.event_connection_seconds:
                            problem += " (event_connection_seconds)"
                        break
                    if not data:
                        for item in decoder.close():
                            await self.handle_item(item, sender, tally)
                        break
                    room_left = config.event_connection_lines - tally.lines
                    items = decoder.feed(data)
                    for item in items[:room_left]:
                        await self.handle_item(item, sender, tally)
                    if len(items) > room_left:
                        problem = (
                            f"it sent more than {config.event_connection_lines} lines"
                            " (event_connection_lines)"
                        )
                        break
        finally:
            if room is not None:
                room.release()
            if per_uid is not None:
                per_uid[sender.peer.uid] -= 1
                if not per_uid[sender.peer.uid]:
                    del per_uid[sender.peer.uid]
        if problem and tally.loud:
            log.warning(
                "closed an event connection from %s: %s; what else it sent is dropped",
                sender.describe(),
                problem,
            )
        tally.report(sender)

    async def handle_item(
        self,
        item: Event | BadLine,
        sender: Sender,
        tally: Tally,
        *,
        late: bool = False,
        spooled: bool = False,
    ) -> None:
        """One line from `sender`, on the event socket or (`spooled`) in its spool file."""
        tally.lines += 1
        if isinstance(item, BadLine):
            self.metrics.dropped(item)
            tally.bad += 1
            if tally.loud and tally.bad <= LOGGED_BAD_LINES:
                where = "a spooled" if spooled else "an"
                log.warning("skipped %s event line: %s: %r", where, item.reason, item.excerpt)
            return
        if not sender.may_send_for(item.username, self.usernames.key):
            tally.refuse(item.username)
            return
        if item.name == SPOOL_FULL:
            # Only the driver's own spool file can have been full.
            if spooled:
                await self.push_everyone(sender)
            return
        await self.handle_event(item, late=late)

    async def push_everyone(self, sender: Sender) -> None:
        """Push every device `sender` may send events for: what it spooled was cut short."""
        user = None if sender.any_user else self.usernames.key(sender.own or "")
        try:
            devices = await trio.to_thread.run_sync(self.store.devices, user)
        except StoreError as e:
            log.error("cannot push after a full spool: cannot read registrations: %s", e)
            return
        devices = unexpired(devices, self.config.registration_ttl, time.time())
        log.warning(
            "the spool of %s was full or not its own: pushing %d device(s) it may send events"
            " for, since which changed is not known",
            sender.describe(),
            len(devices),
        )
        for device in devices:
            self.sending.submit(device)
        self.sending.wake()

    async def handle_event(self, event: Event, *, late: bool = False) -> None:
        if event.service not in self.config.push_services:
            log.debug("ignored %s in %s from %s", event.name, event.mailbox, event.service)
            return
        user = self.usernames.key(event.username)
        try:
            devices = await trio.to_thread.run_sync(self.store.devices, user)
        except StoreError as e:
            # The mail is delivered regardless; what is lost is this one push.
            log.error("no push for %s's %s: cannot read registrations: %s", user, event.name, e)
            return
        devices = unexpired(devices, self.config.registration_ttl, time.time())
        now = trio.current_time()
        self.metrics.event(event, devices, now)
        if not devices:
            return
        for device in self.dispatcher.event(event, devices, now, late=late):
            log.debug("push %s now: %s in %s", who(device), event.name, event.mailbox)
            self.sending.submit(device)
        self.sending.wake()


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""
