"""Pushes waiting to be sent: at most one per device, retried with backoff (pure).

A mail push carries no content, so two pending pushes to one device are worth
exactly one. That bounds memory by the number of devices, however many events
arrive while APNs is unreachable.

After an outage, each waiting push has grown its own backoff (up to minutes),
and new mail does not cut it short. So while pushes wait only because APNs as a
whole failed, one of them at a time goes early as a probe, at the outage's pace
rather than the device's: its normal answer lets all the others go (`resume`).
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from .store import Registration

DeviceKey = tuple[str, str, str]


def backoff(failures: int, cap: float, jitter: Callable[[], float]) -> float:
    """Doubling from one second up to `cap`, times 0.5 to 1.5 so retries spread out."""
    return min(cap, 2.0 ** min(failures, 16)) * (0.5 + jitter())


@attrs.define
class Outbox:
    retry_deadline: float = 3600.0
    max_backoff: float = 300.0
    # The longest wait between probes while APNs as a whole fails, so pushes flow
    # again within this long after it recovers. Jitter never takes a wait past it,
    # unlike the backoffs': one request at a time is no burst worth spreading.
    probe_interval: float = 60.0
    jitter: Callable[[], float] = random.random
    _ready: dict[DeviceKey, Registration] = attrs.field(factory=dict)
    _in_flight: dict[DeviceKey, bool] = attrs.field(factory=dict)  # key -> push again after
    _waiting: dict[DeviceKey, tuple[Registration, float]] = attrs.field(factory=dict)
    _failures: dict[DeviceKey, tuple[int, float]] = attrs.field(factory=dict)
    # Waiting because APNs as a whole failed (not because of the device).
    _shared: set[DeviceKey] = attrs.field(factory=set)
    # The probe in flight, and when its push was due had it not been taken early.
    _probe: tuple[DeviceKey, float] | None = None
    # The outage's own backoff, grown once per failure the probe pace allows.
    _probe_at: float = 0.0
    _outage_failures: int = 0

    def submit(self, registration: Registration) -> None:
        key = registration.key
        if key in self._in_flight:
            # The push under way may reach the phone before the new mail is
            # visible to it, so one more push follows.
            self._in_flight[key] = True
            return
        if key in self._waiting:
            # The push waiting out its backoff covers this event too; sending it
            # early would let a stream of mail defeat the backoff.
            self._waiting[key] = (registration, self._waiting[key][1])
            return
        self._ready[key] = registration

    def take(self, now: float) -> Registration | None:
        for key in [k for k, (_, at) in self._waiting.items() if at <= now]:
            self._ready[key] = self._waiting.pop(key)[0]
        if not self._ready:
            return self._take_probe(now)
        key = next(iter(self._ready))
        self._in_flight[key] = False
        return self._ready.pop(key)

    def _take_probe(self, now: float) -> Registration | None:
        # Only when nothing asks APNs: any answer under way tells as much.
        if self._in_flight or now < self._probe_at:
            return None
        key = min(
            (k for k in self._shared if k in self._waiting),
            key=lambda k: self._waiting[k][1],
            default=None,
        )
        if key is None:
            return None
        registration, due = self._waiting.pop(key)
        self._probe = (key, due)
        self._in_flight[key] = False
        return registration

    def delivered(self, registration: Registration) -> None:
        """Sent, or given up for good: either way this push is finished."""
        self._end_probe(registration.key)
        self._failures.pop(registration.key, None)
        self._shared.discard(registration.key)
        if self._in_flight.pop(registration.key, False):
            self._ready[registration.key] = registration

    def failed(self, registration: Registration, now: float, shared: bool = False) -> bool:
        """A push that may succeed later; False when its retry deadline has passed.

        `shared`: the failure was APNs's as a whole (unreachable, 5xx), so the push
        need not wait out its backoff once APNs is back (`resume`).
        """
        key = registration.key
        probe = self._end_probe(key)
        if shared:
            self._shared.add(key)
            self._outage_failed(now)
        else:
            self._shared.discard(key)
        again = self._in_flight.pop(key, False)
        attempts, first = self._failures.get(key, (0, now))
        if now - first >= self.retry_deadline:
            del self._failures[key]
            self._shared.discard(key)
            if again:
                self._ready[key] = registration
            return False
        if probe is not None and shared:
            # The outage's failure, not the device's: its own retry stays as it was.
            self._waiting[key] = (registration, probe)
            return True
        wait = backoff(attempts, self.max_backoff, self.jitter)
        self._failures[key] = (attempts + 1, first)
        self._waiting[key] = (registration, now + wait)
        return True

    def _outage_failed(self, now: float) -> None:
        # Pushes sent together fail together: one failure of the outage, as at the gate.
        if now < self._probe_at:
            return
        wait = min(
            self.probe_interval, backoff(self._outage_failures, self.probe_interval, self.jitter)
        )
        self._outage_failures += 1
        self._probe_at = now + wait

    def _end_probe(self, key: DeviceKey) -> float | None:
        """When the push was due, if `key` was the probe."""
        if self._probe is None or self._probe[0] != key:
            return None
        due, self._probe = self._probe[1], None
        return due

    def hold(self, registration: Registration) -> None:
        """Not sent, through no fault of the device (sending is paused): ready again."""
        key = registration.key
        self._end_probe(key)
        self._in_flight.pop(key, None)
        self._ready[key] = registration

    def resume(self) -> int:
        """APNs works again: what waited only because of it goes now. How many."""
        keys = [key for key in self._shared if key in self._waiting]
        for key in keys:
            self._ready[key] = self._waiting.pop(key)[0]
        self._shared.clear()
        self._outage_failures, self._probe_at = 0, 0.0
        return len(keys)

    def next_retry(self) -> float | None:
        """When `take` may next have something, if nothing else happens before."""
        retry = min((at for _, at in self._waiting.values()), default=None)
        if not self._in_flight and any(k in self._waiting for k in self._shared):
            retry = min(retry, self._probe_at) if retry is not None else self._probe_at
        return retry

    def __len__(self) -> int:
        return len(self._ready) + len(self._in_flight) + len(self._waiting)


@attrs.define
class Gate:
    """Whether sending may go on at all, whatever the device.

    A failure without an answer (refused, reset, timed out) says nothing about the
    device and everything about the connection: every pending push would fail the
    same way, so the gate closes for a growing backoff instead of letting each
    device reconnect on its own (APNs treats rapid reconnects as abuse). A
    configuration error (certificate refused, topic not allowed) closes it until
    new credentials are loaded, with one probe every `refused_probe` seconds in
    case the cause went away on Apple's side.
    """

    max_backoff: float = 60.0
    refused_probe: float = 600.0
    jitter: Callable[[], float] = random.random
    refused: str | None = None
    _opens_at: float = 0.0
    _failures: int = 0
    # Kinds of trouble seen since APNs last answered normally, and since when.
    _troubles: set[str] = attrs.field(factory=set)
    _trouble_since: float | None = None

    def is_open(self, now: float) -> bool:
        return now >= self._opens_at

    def opens_at(self) -> float:
        return self._opens_at

    def answered(self) -> None:
        """APNs answered: the connection works."""
        self._failures = 0
        self.refused = None

    def transport_failed(self, now: float) -> None:
        # Pushes in flight when the connection broke all fail together: one failure.
        if now < self._opens_at:
            return
        self._opens_at = now + backoff(self._failures, self.max_backoff, self.jitter)
        self._failures += 1

    def trouble(self, kind: str, now: float) -> bool:
        """A failure worth retrying; True if this kind is new in this outage (log it)."""
        if self._trouble_since is None:
            self._trouble_since = now
        new = kind not in self._troubles
        self._troubles.add(kind)
        return new

    def recovered(self, now: float) -> float | None:
        """APNs answered normally: how long the trouble lasted, if there was any."""
        if self._trouble_since is None:
            return None
        lasted, self._trouble_since = now - self._trouble_since, None
        self._troubles.clear()
        return lasted

    def refuse(self, reason: str, now: float) -> bool:
        """Close until new credentials; True the first time, when the alarm is due."""
        first = self.refused is None
        self.refused = reason
        self._opens_at = now + self.refused_probe
        return first

    def reopen(self) -> None:
        """New credentials: try again now."""
        self.refused = None
        self._failures = 0
        self._opens_at = 0.0
