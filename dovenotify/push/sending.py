"""Pushes to APNs: the send loop, what each answer means, and the credentials in use.

Devices come in through `submit` (now) or the dispatcher (when due); the outbox
keeps them until APNs has answered, retrying with backoff, and the gate pauses
sending while APNs is unreachable or refuses our credentials.
"""

from __future__ import annotations

import logging
import time

import attrs
import trio

from dovenotify.admin.metrics import Metrics
from dovenotify.apns import protocol as apns
from dovenotify.apns.auth import Auth, configure_sender, expiry_warning, reload_auth
from dovenotify.apns.outbox import Gate, Outbox
from dovenotify.apns.sender import ApnsSender
from dovenotify.core.config import Config
from dovenotify.events.dispatch import Dispatcher
from dovenotify.store.base import Registration, Store, StoreError, who

log = logging.getLogger("dovenotify")

SEND_CONCURRENCY = 64


DRAIN_TIMEOUT = 10.0


EXPIRY_CHECK_INTERVAL = 3600.0


NOT_FOR_TOPIC = apns.Action.TOKEN_NOT_FOR_TOPIC.value


@attrs.define
class Sending:
    config: Config
    store: Store
    sender: ApnsSender
    auth: Auth
    dispatcher: Dispatcher = attrs.field(factory=Dispatcher)
    metrics: Metrics = attrs.field(factory=Metrics)
    outbox: Outbox = attrs.field(factory=Outbox)
    gate: Gate = attrs.field(factory=Gate)
    _expiry_warned: int | None = None
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    _progress: trio.Event = attrs.field(factory=trio.Event)

    def submit(self, device: Registration) -> None:
        """Push to `device` as soon as the gate allows; call `wake` after a batch."""
        self.outbox.submit(device)

    def wake(self) -> None:
        self._wakeup.set()

    def __len__(self) -> int:
        """Pushes not yet answered, those the dispatcher holds back included."""
        return len(self.outbox) + len(self.dispatcher)

    @property
    def topic(self) -> str:
        return self.auth.topic

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
            log.error("could not record the push to %s: %s", who(device), e)
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
            log.warning("%s is registered for another topic: %s", who(device), result)
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
                    who(device),
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
                    who(device),
                    result,
                )
            else:
                log.warning("gave up pushing to %s: %s", who(device), result)
                self.metrics.gave_up(device)
            return
        self.outbox.delivered(device)
        log.debug("pushed %s: %s", who(device), result)
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
                log.info("removed %s: APNs says %s", who(device), outcome.reason)
        elif outcome.action is apns.Action.TOKEN_NOT_FOR_TOPIC:
            log.warning(
                "%s: APNs says the token does not belong to topic %s; no more pushes"
                " to it until the device registers again",
                who(device),
                device.topic,
            )

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
