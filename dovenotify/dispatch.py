"""Which devices to push, and when (pure: time is a parameter, nothing sleeps here).

New mail (MessageNew, MessageAppend) pushes at once. Other changes (expunge,
flags, renames) only make the device's view stale, so they wait `delay` seconds for
more to coalesce, but never longer than `max_delay` after the first of them, so
continuous activity cannot postpone a push forever. A new-mail push absorbs the
pending delayed one.

Mailboxes: creating one pushes nobody (it is empty, and no device registered
it yet). Renaming or deleting one is a delayed push to the devices that
registered it under its old name: their next sync shows the change and they
register again with the new list.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from .events import Event
from .mailboxes import key
from .store import Registration

IMMEDIATE = frozenset({"MessageNew", "MessageAppend"})
DELAYED = frozenset({"MessageExpunge", "FlagsSet", "FlagsClear", "MailboxRename", "MailboxDelete"})

DeviceKey = tuple[str, str, str]


def wants(registration: Registration, mailbox: str) -> bool:
    """Did this device register for this mailbox? Both names are UTF-8 (the store's
    are decoded at registration); INBOX is case-insensitive (RFC 3501)."""
    if mailbox in registration.mailboxes:
        return True
    # Only names starting with INBOX can match a name spelled otherwise (and every
    # event and registration is looked at here: keep the usual case cheap).
    if mailbox[:5].upper() != "INBOX":
        return False
    wanted = key(mailbox)
    return any(key(m) == wanted for m in registration.mailboxes)


def _concerns(event: Event, device: Registration) -> bool:
    return wants(device, event.mailbox) or bool(
        event.old_mailbox and wants(device, event.old_mailbox)
    )


@attrs.define
class _Pending:
    registration: Registration
    first: float
    due: float


@attrs.define
class Dispatcher:
    delay: float = 30.0
    max_delay: float = 120.0
    _pending: dict[DeviceKey, _Pending] = attrs.field(factory=dict)

    def event(
        self, event: Event, devices: Iterable[Registration], now: float, *, late: bool = False
    ) -> list[Registration]:
        """Take one event for the given user's devices; return those to push now.

        `late`: the event happened while the service could not hear it (it was
        spooled); whatever its kind, it has waited long enough.
        """
        if event.name not in IMMEDIATE and event.name not in DELAYED:
            return []
        targets = [d for d in devices if _concerns(event, d)]
        if event.name in IMMEDIATE or late:
            for device in targets:
                self._pending.pop(device.key, None)
            return targets
        for device in targets:
            pending = self._pending.get(device.key)
            if pending is None:
                self._pending[device.key] = _Pending(device, now, now + self.delay)
            else:
                pending.registration = device
                pending.due = min(now + self.delay, pending.first + self.max_delay)
        return []

    def due(self, now: float) -> list[Registration]:
        """Delayed pushes whose time has come; they leave the pending set."""
        ready = [key for key, p in self._pending.items() if p.due <= now]
        return [self._pending.pop(key).registration for key in ready]

    def next_due(self) -> float | None:
        return min((p.due for p in self._pending.values()), default=None)

    def __len__(self) -> int:
        """Devices with a delayed push waiting."""
        return len(self._pending)

    def flush(self) -> list[Registration]:
        """Everything pending, now: for a shutdown that must not lose a push."""
        pending, self._pending = self._pending, {}
        return [p.registration for p in pending.values()]
