"""The relay as configured: its socket, and registrations stored under the user key.

Shared by `dovenotify serve` (relay_process: inline) and `dovenotify relay`
(separate); the topic comes in as a function, so the relay needs no APNs code.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from dovenotify.core.config import Config
from dovenotify.core.sockets import unix_listener
from dovenotify.core.usernames import UserKeys
from dovenotify.relay.server import Register, Relay, allowed_uids
from dovenotify.store.base import Registration, Store


async def register_keyed(store: Store, usernames: UserKeys, registration: Registration) -> None:
    """Store a registration under the user key that events are matched by."""
    user = usernames.key(registration.username)
    await trio.to_thread.run_sync(store.register, attrs.evolve(registration, username=user))


def open_relay(
    config: Config, topic: Callable[[], str], register: Register
) -> tuple[Relay, trio.SocketListener]:
    """The relay and its socket: in `serve`, or in `dovenotify relay` (relay_process)."""
    the_relay = Relay(topic=topic, register=register, allowed_uids=allowed_uids(config.relay_peers))
    return the_relay, unix_listener(config.relay_socket, 0o666)
