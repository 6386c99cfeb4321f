"""The relay as configured: its socket, and registrations stored under the user key.

Shared by `dovenotify serve` (relay_process: inline) and `dovenotify relay`
(separate); the topic comes in as a function, so the relay needs no APNs code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from dovenotify.core.config import Config
from dovenotify.core.sockets import unix_listener
from dovenotify.core.usernames import UserKeys
from dovenotify.relay.handoff import allowed_uids
from dovenotify.relay.server import Register, Relay
from dovenotify.store.base import Registration, Store, who

log = logging.getLogger("dovenotify")


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
            who(registration),
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
    config: Config, topic: Callable[[], str], register: Register
) -> tuple[Relay, trio.SocketListener]:
    """The relay and its socket: in `serve`, or in `dovenotify relay` (relay_process)."""
    the_relay = Relay(
        topic=topic,
        register=register,
        allowed_uids=allowed_uids(config.relay_peers),
        mailboxes_per_registration=config.mailboxes_per_registration,
    )
    return the_relay, unix_listener(config.relay_socket, 0o666)
