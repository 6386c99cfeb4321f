"""Events from Dovecot, to pushes: the event socket, the spool, and who is told.

Each event is matched to the user's registrations and handed to the dispatcher,
which says which devices to push now; `Sending` takes them from there.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from dovenotify.admin.metrics import Metrics
from dovenotify.core.config import Config
from dovenotify.core.usernames import UserKeys
from dovenotify.events import spool
from dovenotify.events.decoder import BadLine, Event, EventDecoder
from dovenotify.events.dispatch import Dispatcher
from dovenotify.events.peers import PeerRule, peer_of
from dovenotify.push.sending import Sending, who
from dovenotify.store.base import Store, StoreError
from dovenotify.store.expiry import unexpired

log = logging.getLogger("dovenotify")

EVENT_CONNECTION_TIMEOUT = 10.0


# Each open event connection holds a task and its buffers. Past this many, new
# ones wait in the listen queue, and a Lua driver that waits past its timeout
# spools its lines: a burst costs latency, never unbounded memory.
MAX_EVENT_CONNECTIONS = 256


# How often the spool is checked for events the Lua driver could not send us
# (e.g. while this process was stopped): a stat() of one file.
SPOOL_CHECK_INTERVAL = 2.0


# Time for a writer that opened the spool just before a drain to finish its append.
SPOOL_GRACE = 0.5


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
    event_peers: PeerRule | None = None

    async def serve_events(self, listener: trio.SocketListener) -> None:
        # A semaphore, not a CapacityLimiter: the connection's task releases it.
        room = trio.Semaphore(MAX_EVENT_CONNECTIONS)
        async with trio.open_nursery() as nursery:
            while True:
                await room.acquire()
                stream = await listener.accept()
                if self._event_peer_allowed(stream):
                    nursery.start_soon(self._read_events, stream, room)
                else:
                    await stream.aclose()
                    room.release()

    def _event_peer_allowed(self, stream: trio.SocketStream) -> bool:
        if self.event_peers is None:
            return True
        peer = peer_of(stream.socket)  # type: ignore[arg-type]
        if self.event_peers.allows(peer):
            return True
        log.warning(
            "refused events from pid %d (uid %d, gid %d): event_peers allows only %s",
            peer.pid,
            peer.uid,
            peer.gid,
            self.event_peers.describe(),
        )
        return False

    async def _read_events(self, stream: trio.SocketStream, room: trio.Semaphore) -> None:
        decoder = EventDecoder()
        items: list[Event | BadLine] = []
        try:
            async with stream:
                with trio.move_on_after(EVENT_CONNECTION_TIMEOUT):
                    while data := await _receive(stream):
                        items += decoder.feed(data)
            items += decoder.close()
            await self._handle_items(items)
        finally:
            room.release()

    async def _handle_items(self, items: list[Event | BadLine], *, late: bool = False) -> None:
        for item in items:
            if isinstance(item, BadLine):
                self.metrics.dropped(item)
                where = "a spooled" if late else "an"
                log.warning("skipped %s event line: %s: %r", where, item.reason, item.excerpt)
            else:
                await self.handle_event(item, late=late)

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

    async def drain_spool(self) -> None:
        """Push for the events the Lua driver spooled while it could not reach us."""
        path = self.config.event_spool
        problem = None
        while True:
            try:
                found = await trio.to_thread.run_sync(spool.set_aside, path)
                if found:
                    await trio.sleep(SPOOL_GRACE)
                    items = await trio.to_thread.run_sync(spool.take_aside, path)
                problem = None
            except OSError as e:
                found = False
                if str(e) != problem:  # once, not every few seconds
                    problem = str(e)
                    log.warning("cannot drain the event spool %s: %s", path, e)
            if found:
                count = sum(isinstance(item, Event) for item in items)
                log.info("%d event(s) from the spool, made while dovenotify was away", count)
                await self._handle_items(items, late=True)
            await trio.sleep(SPOOL_CHECK_INTERVAL)


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""
