"""Pushes waiting to be sent: at most one per device, retried with backoff (pure).

A mail push carries no content, so two pending pushes to one device are worth
exactly one. That bounds memory by the number of devices, however many events
arrive while APNs is unreachable.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from .store import Registration

DeviceKey = tuple[str, str, str]


@attrs.define
class Outbox:
    retry_deadline: float = 3600.0
    max_backoff: float = 300.0
    jitter: Callable[[], float] = random.random
    _ready: dict[DeviceKey, Registration] = attrs.field(factory=dict)
    _in_flight: dict[DeviceKey, bool] = attrs.field(factory=dict)  # key -> push again after
    _waiting: dict[DeviceKey, tuple[Registration, float]] = attrs.field(factory=dict)
    _failures: dict[DeviceKey, tuple[int, float]] = attrs.field(factory=dict)
    # Waiting because APNs as a whole failed (not because of the device).
    _shared: set[DeviceKey] = attrs.field(factory=set)

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
            return None
        key = next(iter(self._ready))
        self._in_flight[key] = False
        return self._ready.pop(key)

    def delivered(self, registration: Registration) -> None:
        """Sent, or given up for good: either way this push is finished."""
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
        if shared:
            self._shared.add(key)
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
        backoff = min(self.max_backoff, 2.0 ** min(attempts, 16)) * (0.5 + self.jitter())
        self._failures[key] = (attempts + 1, first)
        self._waiting[key] = (registration, now + backoff)
        return True

    def hold(self, registration: Registration) -> None:
        """Not sent, through no fault of the device (sending is paused): ready again."""
        key = registration.key
        self._in_flight.pop(key, None)
        self._ready[key] = registration

    def resume(self) -> int:
        """APNs works again: what waited only because of it goes now. How many."""
        keys = [key for key in self._shared if key in self._waiting]
        for key in keys:
            self._ready[key] = self._waiting.pop(key)[0]
        self._shared.clear()
        return len(keys)

    def next_retry(self) -> float | None:
        return min((at for _, at in self._waiting.values()), default=None)

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
        backoff = min(self.max_backoff, 2.0 ** min(self._failures, 16)) * (0.5 + self.jitter())
        self._failures += 1
        self._opens_at = now + backoff

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
