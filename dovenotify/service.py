"""`dovenotify serve`: wires listeners, dispatcher, outbox and sender in one nursery.

Signals: SIGTERM/SIGINT stop accepting, push whatever is pending (delayed pushes
included) for up to `drain_timeout` seconds, then exit. SIGHUP loads the APNs
credentials again (a replaced certificate) and resumes sending if it was paused.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import attrs
import trio

from . import apns, directories, relay, spool
from .apns_auth import Auth, configure_sender, expiry_warning, load_auth, open_sender, reload_auth
from .apns_sender import ApnsSender
from .config import Config
from .dispatch import Dispatcher
from .endpoints import open_endpoints, serve_endpoints
from .events import SPOOL_FULL, BadLine, Event, EventDecoder
from .listening import Acceptor
from .metrics import Metrics
from .outbox import Gate, Outbox
from .peers import EventPolicy, Peer, PeerRule, Sender, peer_of
from .registration_expiry import sweep_expired, unexpired
from .store import Registration, Store, StoreError, open_store
from .usernames import UserKeys

log = logging.getLogger("dovenotify")

# How long a connection past its uid's share (event_connections_per_uid) is read.
OVER_SHARE_SECONDS = 0.05
# Bad lines logged per connection or spool file; the rest are counted.
LOGGED_BAD_LINES = 10
# Distinct spooled lines remembered while draining, to handle each once.
SPOOL_DISTINCT = 10000
# How often the spool is checked for events the Lua driver could not send us
# (e.g. while this process was stopped): one small directory listing.
SPOOL_CHECK_INTERVAL = 2.0
# Time for a writer that opened the spool just before a drain to finish its append.
SPOOL_GRACE = 0.5
SEND_CONCURRENCY = 64
DRAIN_TIMEOUT = 10.0
EXPIRY_CHECK_INTERVAL = 3600.0
NOT_FOR_TOPIC = apns.Action.TOKEN_NOT_FOR_TOPIC.value


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


@attrs.define
class Service:
    config: Config
    store: Store
    sender: ApnsSender
    auth: Auth
    dispatcher: Dispatcher = attrs.field(factory=Dispatcher)
    outbox: Outbox = attrs.field(factory=Outbox)
    gate: Gate = attrs.field(factory=Gate)
    metrics: Metrics = attrs.field(factory=Metrics)
    usernames: UserKeys = attrs.field(factory=UserKeys)
    event_policy: EventPolicy = attrs.field(factory=lambda: EventPolicy(PeerRule.parse(())))
    _quiet: Quiet = attrs.field(factory=Quiet)
    _expiry_warned: int | None = None
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _progress: trio.Event = attrs.field(factory=trio.Event)

    # --- events ----------------------------------------------------------

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
        tally = Tally(functools.partial(self._quiet.loud, sender.peer.uid))
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
                            await self._handle_item(item, sender, tally)
                        break
                    room_left = config.event_connection_lines - tally.lines
                    items = decoder.feed(data)
                    for item in items[:room_left]:
                        await self._handle_item(item, sender, tally)
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

    async def _handle_item(
        self, item: Event | BadLine, sender: Sender, tally: Tally, *, late: bool = False
    ) -> None:
        tally.lines += 1
        if isinstance(item, BadLine):
            self.metrics.dropped(item)
            tally.bad += 1
            if tally.loud and tally.bad <= LOGGED_BAD_LINES:
                where = "a spooled" if late else "an"
                log.warning("skipped %s event line: %s: %r", where, item.reason, item.excerpt)
            return
        if not sender.may_send_for(item.username, self.usernames.key):
            tally.refuse(item.username)
            return
        if item.name == SPOOL_FULL:
            if late:
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
            self.outbox.submit(device)
        self._wakeup.set()

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
            log.debug("push %s now: %s in %s", _who(device), event.name, event.mailbox)
            self.outbox.submit(device)
        self._wakeup.set()

    async def drain_spool(self) -> None:
        """Push for the events the Lua driver spooled while it could not reach us."""
        path = self.config.event_spool
        old = spool.legacy(path)
        if old.exists():
            # An older dovenotify's single file, written as the mail uid.
            anyone = Sender(Peer(0, 0, 0), True, None)
            await self._drain_file(spool.Spooled(old, 0, 0, None), anyone)
        problem = None
        while True:
            try:
                found = await trio.to_thread.run_sync(spool.set_aside, path)
                problem = None
            except OSError as e:
                found = []
                if str(e) != problem:  # once, not every few seconds
                    problem = str(e)
                    log.warning("cannot drain the event spool %s: %s", path, e)
            if found:
                # A writer that opened a file just before it was renamed finishes
                # its one append.
                await trio.sleep(SPOOL_GRACE)
            for spooled in found:
                sender = self.event_policy.sender(Peer(0, spooled.uid, spooled.gid))
                if spooled.squatted:
                    # Another uid made the file first: its lines may be anyone's,
                    # and the uid it is named for may have lost its own.
                    named = Peer(0, spooled.named_uid or 0, spooled.gid)
                    await self.push_everyone(self.event_policy.sender(named))
                    await trio.to_thread.run_sync(spooled.path.unlink)
                    continue
                await self._drain_file(spooled, sender)
            await trio.sleep(SPOOL_CHECK_INTERVAL)

    async def _drain_file(self, spooled: spool.Spooled, sender: Sender) -> None:
        decoder = EventDecoder(self.config.event_line_max)
        tally = Tally()
        # The driver stops at event_spool_size; a uid writing its file itself may
        # not, and is read no further than the driver would have written.
        budget = self.config.event_spool_size + self.config.event_line_max
        # Lines repeat (a user's INBOX, delivery after delivery): each distinct one
        # is handled once, remembering a bounded number of them.
        seen: dict[Event | BadLine, None] = {}
        try:
            with contextlib.closing(spool.chunks(spooled.path)) as chunks:
                while budget > 0 and (chunk := await trio.to_thread.run_sync(next, chunks, b"")):
                    budget -= len(chunk)
                    for item in decoder.feed(chunk):
                        if item in seen:
                            continue
                        if len(seen) >= SPOOL_DISTINCT:
                            seen.clear()
                        seen[item] = None
                        await self._handle_item(item, sender, tally, late=True)
        except OSError as e:
            log.warning("cannot read the spooled events in %s: %s", spooled.path, e)
        with contextlib.suppress(OSError):
            spooled.path.unlink()
        if budget <= 0:
            log.warning(
                "the spool of %s is bigger than event_spool_size (%d bytes): the rest of it"
                " is not read",
                sender.describe(),
                self.config.event_spool_size,
            )
            await self.push_everyone(sender)
        else:
            for item in decoder.close():
                await self._handle_item(item, sender, tally, late=True)
        log.info(
            "%d event line(s) from the spool of %s, made while dovenotify was away",
            tally.lines,
            sender.describe(),
        )
        tally.report(sender)

    @property
    def topic(self) -> str:
        return self.auth.topic

    # --- registrations ---------------------------------------------------

    async def register(self, registration: Registration) -> None:
        await register_keyed(
            self.store,
            self.usernames,
            registration,
            per_user=self.config.registrations_per_user,
            mailboxes=self.config.mailboxes_per_registration,
        )

    # --- sending ---------------------------------------------------------

    async def run_sender(self) -> None:
        """Move due pushes to the outbox and send what is ready, within a bound."""
        limit = trio.CapacityLimiter(SEND_CONCURRENCY)
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                for device in self.dispatcher.due(now):
                    self.outbox.submit(device)
                while (
                    self.gate.is_open(now)
                    # While APNs refuses us, one probe at a time.
                    and (self.gate.refused is None or not limit.borrowed_tokens)
                    and limit.available_tokens
                    and (device := self.outbox.take(now))
                ):
                    # A ticket per send, not the device: a device pushed again (mail
                    # came while it was in flight) can be taken before its previous
                    # send has given its token back.
                    ticket = object()
                    await limit.acquire_on_behalf_of(ticket)
                    nursery.start_soon(self._send, device, limit, ticket)
                retry = self.outbox.next_retry()
                if retry is not None:
                    retry = max(retry, self.gate.opens_at())
                elif len(self.outbox) and not self.gate.is_open(now):
                    retry = self.gate.opens_at()
                deadline = min(
                    (t for t in (self.dispatcher.next_due(), retry) if t),
                    default=None,
                )
                self._wakeup = trio.Event()
                with trio.move_on_at(deadline if deadline is not None else float("inf")):
                    await self._wakeup.wait()

    async def _send(
        self, device: Registration, limit: trio.CapacityLimiter, ticket: object
    ) -> None:
        try:
            if not await self._pushable(device):
                self.outbox.delivered(device)
                return
            push = apns.Push(
                device_token=device.device_token,
                topic=device.topic,
                account_id=device.account_id,
                push_type=self.config.apns.push_type,
                expiration_seconds=self.config.apns.expiration,
                priority=self.config.apns.priority,
            )
            outcome = await self.sender.send(push)
            await self._record(device, outcome)
        except StoreError as e:
            # The push went out; only its bookkeeping failed. Sending goes on.
            log.error("could not record the push to %s: %s", _who(device), e)
        finally:
            limit.release_on_behalf_of(ticket)
            self._wakeup.set()
            self._progress.set()

    async def _pushable(self, device: Registration) -> bool:
        """Not for a registration the current credentials cannot push to.

        It stays (the device re-registers under the new topic at its next login),
        and `dovenotify devices` shows why it gets no pushes.
        """
        if (
            device.last_push_result is not None
            and device.last_push_result.startswith(NOT_FOR_TOPIC)
            and device.last_push_at is not None
            and device.last_push_at >= device.registered_at
        ):
            return False
        if device.topic in self.auth.topics:
            return True
        result = f"not pushed: topic {device.topic} is not served by {self.auth.describe()}"
        if device.last_push_result != result:
            log.warning("%s is registered for another topic: %s", _who(device), result)
            await trio.to_thread.run_sync(self.store.record_push, device.key, time.time(), result)
        return False

    async def _record(self, device: Registration, outcome: apns.Outcome) -> None:
        result = describe(outcome)
        now = trio.current_time()
        self.metrics.pushed(device, outcome, now)
        if outcome.status is None and outcome.action is apns.Action.RETRY:
            self.gate.transport_failed(now)
        elif outcome.action is apns.Action.CONFIG_ERROR:
            # Every push would be refused alike: keep them all until it is fixed.
            self.outbox.hold(device)
            if self.gate.refuse(result, now):
                log.error(
                    "APNs refused a push to %s: %s. Sending is paused until the"
                    " credentials are fixed and dovenotify is reloaded (SIGHUP);"
                    " pending pushes are kept.",
                    _who(device),
                    result,
                )
            return
        else:
            self.gate.answered()
        # An outage is told once per kind of failure, and when it ends, rather than
        # once per device and retry.
        trouble = _trouble(outcome)
        if trouble is not None:
            if self.gate.trouble(trouble, now):
                log.warning("%s; pending pushes are kept and retried with backoff", trouble)
        elif outcome.status is not None and (lasted := self.gate.recovered(now)) is not None:
            # Pushes held back by the outage need not wait out their backoffs.
            resumed = self.outbox.resume()
            log.info("APNs answers normally again after %.0f s; %d pushes resume", lasted, resumed)
        if outcome.action is apns.Action.RETRY:
            if self.outbox.failed(device, now, shared=trouble is not None):
                log.log(
                    logging.DEBUG if trouble else logging.INFO,
                    "push to %s will be retried: %s",
                    _who(device),
                    result,
                )
            else:
                log.warning("gave up pushing to %s: %s", _who(device), result)
                self.metrics.gave_up(device)
            return
        self.outbox.delivered(device)
        log.debug("pushed %s: %s", _who(device), result)
        await trio.to_thread.run_sync(self.store.record_push, device.key, time.time(), result)
        if outcome.action is apns.Action.DROP_TOKEN:
            # A 410 carries when APNs learnt the token was dead: a registration
            # made after that is a fresh one and stays.
            before = outcome.timestamp_ms / 1000 if outcome.timestamp_ms else None
            removed = await trio.to_thread.run_sync(
                lambda: self.store.remove(
                    username=device.username,
                    account_id=device.account_id,
                    device_token=device.device_token,
                    registered_before=before,
                )
            )
            if removed:
                log.info("removed %s: APNs says %s", _who(device), outcome.reason)
        elif outcome.action is apns.Action.TOKEN_NOT_FOR_TOPIC:
            log.warning(
                "%s: APNs says the token does not belong to topic %s; no more pushes"
                " to it until the device registers again",
                _who(device),
                device.topic,
            )

    # --- credentials -----------------------------------------------------

    async def reload(self) -> None:
        """Load the credentials again (SIGHUP), and resume sending with them."""
        reloaded = reload_auth(self.config.path, self.auth)
        if reloaded is None:
            return
        apns_config, auth = reloaded
        # The connection in use takes no new pushes; those in flight finish there.
        configure_sender(self.sender, apns_config, auth)
        self.auth = auth
        self.config = attrs.evolve(self.config, apns=apns_config)
        self._expiry_warned = None
        self.check_expiry()
        self.gate.reopen()
        self._wakeup.set()
        log.info("reloaded: now using %s", auth.describe())

    def check_expiry(self) -> None:
        credentials = self.auth.credentials
        if credentials is None:
            return
        days = credentials.days_left()
        threshold = expiry_warning(days)
        if threshold is not None and threshold != self._expiry_warned:
            self._expiry_warned = threshold
            log.warning(
                "the APNs certificate %s expires on %s, in %.0f days: replace it before then"
                " (`dovenotify cert import`, then reload)",
                credentials.source,
                f"{credentials.not_after:%Y-%m-%d %H:%M} UTC",
                days,
            )

    async def watch_expiry(self) -> None:
        while True:
            await trio.sleep(EXPIRY_CHECK_INTERVAL)
            self.check_expiry()

    # --- shutdown --------------------------------------------------------

    async def drain(self) -> None:
        for device in self.dispatcher.flush():
            self.outbox.submit(device)
        self._wakeup.set()
        with trio.move_on_after(DRAIN_TIMEOUT):
            # While APNs refuses our credentials, waiting would send nothing.
            while len(self.outbox) and self.gate.refused is None:
                self._progress = trio.Event()
                await self._progress.wait()
        if len(self.outbox):
            log.warning("stopped with %d pushes unsent", len(self.outbox))


def describe(outcome: apns.Outcome) -> str:
    if outcome.action is apns.Action.DELIVERED:
        return "delivered"
    status = f"{outcome.status} " if outcome.status else ""
    return f"{outcome.action.value} ({status}{outcome.reason})"


def _trouble(outcome: apns.Outcome) -> str | None:
    """What is wrong with APNs as a whole, when a retry says so (not a 429)."""
    if outcome.action is not apns.Action.RETRY:
        return None
    if outcome.status is None:
        kind = outcome.reason.split(":", 1)[0]
        # A connection that never came up says why (DNS, refused, TLS): what the admin fixes.
        return f"APNs cannot be reached ({outcome.reason if kind == 'ConnectError' else kind})"
    if outcome.status >= 500:
        return f"APNs answers {outcome.status} {outcome.reason}"
    return None


def _who(device: Registration) -> str:
    return f"{device.username} device {relay.short_token(device.device_token)}"


async def _receive(stream: trio.SocketStream) -> bytes:
    try:
        return await stream.receive_some(65536)
    except trio.BrokenResourceError:
        return b""


async def register_keyed(
    store: Store,
    usernames: UserKeys,
    registration: Registration,
    *,
    per_user: int,
    mailboxes: int,
) -> None:
    """Store a registration under the user key that events are matched by, within the
    bounds: `mailboxes` per registration, `per_user` registrations (the oldest go)."""
    if len(registration.mailboxes) > mailboxes:
        log.warning(
            "%s asked pushes for %d mailboxes; only the first %d are pushed"
            " (mailboxes_per_registration)",
            _who(registration),
            len(registration.mailboxes),
            mailboxes,
        )
    registration = attrs.evolve(
        registration,
        username=usernames.key(registration.username),
        mailboxes=registration.mailboxes[:mailboxes],
    )
    await trio.to_thread.run_sync(_register_bounded, store, registration, per_user)


def _register_bounded(store: Store, registration: Registration, per_user: int) -> None:
    store.register(registration)
    others = [d for d in store.devices(registration.username) if d.key != registration.key]
    surplus = len(others) + 1 - per_user
    if surplus <= 0:
        return
    for old in sorted(others, key=lambda d: d.registered_at)[:surplus]:
        store.remove(
            username=old.username, account_id=old.account_id, device_token=old.device_token
        )
    log.warning(
        "%s has more than %d registrations (registrations_per_user): removed the %d oldest",
        registration.username,
        per_user,
        surplus,
    )


def open_relay(
    config: Config, topic: Callable[[], str], register: relay.Register
) -> tuple[relay.Relay, trio.SocketListener]:
    """The relay and its socket: in `serve`, or in `dovenotify relay` (relay_process)."""
    the_relay = relay.Relay(
        topic=topic,
        register=register,
        allowed_uids=relay.allowed_uids(config.relay_peers),
        mailboxes_per_registration=config.mailboxes_per_registration,
    )
    return the_relay, unix_listener(config.relay_socket, 0o666)


def unix_listener(path: Path, mode: int) -> trio.SocketListener:
    # Anyone may reach the sockets; who may use them is checked by SO_PEERCRED.
    spool.make_dirs(path.parent, 0o755)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind the stdlib way: trio's bind is async only to resolve names.
    sock._sock.bind(str(path))  # type: ignore[attr-defined]
    os.chmod(path, mode)
    sock.listen(512)
    return trio.SocketListener(sock)


def socket_file(path: Path) -> tuple[int, int] | None:
    """Which file is at `path` now (device, inode); None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_socket(path: Path, bound: tuple[int, int] | None) -> None:
    """Remove the socket file we bound, but not one bound at that path since: a
    `dovenotify relay` started before the inline relay it replaces has stopped."""
    if bound is not None and socket_file(path) == bound:
        with contextlib.suppress(OSError):
            path.unlink()


def notify_ready() -> None:
    """Tell systemd (Type=notify) or a test harness that we are up."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", address)


async def serve(config: Config) -> None:
    directories.check(config)
    auth = load_auth(config.apns)
    store = open_store(config.database)
    service = Service(
        config=config,
        store=store,
        sender=open_sender(config.apns, auth),
        auth=auth,
        outbox=Outbox(retry_deadline=config.retry_deadline),
        dispatcher=Dispatcher(delay=config.delay, max_delay=config.max_delay),
        usernames=UserKeys(config.username_format, config.default_domain),
        event_policy=EventPolicy.build(config.event_peers),
    )
    service.check_expiry()
    # relay_process: separate leaves the relay socket, and its sessions, to `dovenotify relay`.
    the_relay, relayed = None, None
    if config.relay_process == "inline":
        the_relay, relayed = open_relay(config, lambda: service.topic, service.register)
    events = unix_listener(config.event_socket, 0o666)
    sockets = [config.event_socket, *([config.relay_socket] if the_relay else [])]
    bound = {path: socket_file(path) for path in sockets}
    endpoints = await open_endpoints(service, the_relay)
    try:
        problem = spool.create(config.event_spool)
    except OSError as e:
        problem = (
            f"cannot create the event spool {config.event_spool} ({e.strerror or e}):"
            " events sent while dovenotify is down will be lost"
        )
    if problem:
        log.warning("%s", problem)
    try:
        # The sender's connection runs in its own nursery, closed after this one.
        async with service.sender, trio.open_nursery() as nursery:
            nursery.start_soon(service.serve_events, events)
            if the_relay is not None:
                nursery.start_soon(the_relay.serve, relayed)
            nursery.start_soon(service.run_sender)
            nursery.start_soon(serve_endpoints, endpoints, config.http_connections)
            nursery.start_soon(sweep_expired, store, config.registration_ttl)
            nursery.start_soon(service.watch_expiry)
            nursery.start_soon(service.drain_spool)
            log.info(
                "dovenotify is running: events on %s, relay %s, %s, APNs %s",
                config.event_socket,
                f"on {config.relay_socket}" if the_relay else "left to `dovenotify relay`",
                auth.describe(),
                config.apns.endpoint,
            )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                # Ready only once signals are ours: a reload right after start is not lost.
                notify_ready()
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        await service.reload()
                        continue
                    log.info("stopping on %s", signal.Signals(signum).name)
                    break
            await service.drain()
            nursery.cancel_scope.cancel()
    finally:
        for path in sockets:
            remove_socket(path, bound[path])
        store.close()
