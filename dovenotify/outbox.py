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

    def submit(self, registration: Registration) -> None:
        key = registration.key
        if key in self._in_flight:
            # The push under way may reach the phone before the new mail is
            # visible to it, so one more push follows.
            self._in_flight[key] = True
            return
        # A push waiting out a backoff goes now: something new happened.
        self._waiting.pop(key, None)
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
        if self._in_flight.pop(registration.key, False):
            self._ready[registration.key] = registration

    def failed(self, registration: Registration, now: float) -> bool:
        """A push that may succeed later; False when its retry deadline has passed."""
        key = registration.key
        again = self._in_flight.pop(key, False)
        attempts, first = self._failures.get(key, (0, now))
        if now - first >= self.retry_deadline:
            del self._failures[key]
            if again:
                self._ready[key] = registration
            return False
        backoff = min(self.max_backoff, 2.0 ** min(attempts, 16)) * (0.5 + self.jitter())
        self._failures[key] = (attempts + 1, first)
        self._waiting[key] = (registration, now + backoff)
        return True

    def next_retry(self) -> float | None:
        return min((at for _, at in self._waiting.values()), default=None)

    def __len__(self) -> int:
        return len(self._ready) + len(self._in_flight) + len(self._waiting)
