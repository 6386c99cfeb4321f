"""`dovenotify relay`: the registration relay as a process of its own.

With `relay_process: separate`, `dovenotify serve` leaves the relay socket alone
and this process holds every relayed IMAP session, so the push side can be
restarted (an upgrade, a crash, new credentials) without dropping any of them.
It needs the store, to keep registrations, and the APNs credentials only for the
topic it tells devices: it never connects to APNs. Stopping it ends the sessions
it holds, as stopping `serve` does when the relay is inline.
"""

from __future__ import annotations

import functools
import logging
import signal

import trio

from .apns_auth import load_auth, reload_auth
from .config import Config
from .service import notify_ready, open_relay, register_keyed, remove_socket, socket_file
from .store import open_store
from .usernames import UserKeys

log = logging.getLogger("dovenotify.relay")


class InlineRelay(ValueError):
    """The configuration gives the relay to `dovenotify serve` (the CLI prints why)."""


def refuse_inline(config: Config) -> None:
    if config.relay_process != "separate":
        raise InlineRelay(
            f"{config.path} says relay_process: {config.relay_process}, so `dovenotify serve`"
            " runs the relay itself. To run it as a process of its own, set"
            f" `relay_process: separate` in {config.path}, start `dovenotify relay` (it"
            " takes the relay socket over), then restart `dovenotify serve`."
        )


async def run(config: Config) -> None:
    # Before anything is opened: two relays would take the socket from each other.
    refuse_inline(config)
    auth = load_auth(config.apns)
    store = open_store(config.database)
    try:
        register = functools.partial(
            register_keyed,
            store,
            UserKeys(config.username_format, config.default_domain),
            per_user=config.registrations_per_user,
            mailboxes=config.mailboxes_per_registration,
        )
        # The lambda reads `auth` when asked, so a reload changes the topic told.
        the_relay, listener = open_relay(config, lambda: auth.topic, register)
        bound = socket_file(config.relay_socket)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(the_relay.serve, listener)
                log.info(
                    "dovenotify relay is running on %s, telling devices topic %s",
                    config.relay_socket,
                    auth.topic,
                )
                notify_ready()
                with trio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                ) as signals:
                    async for signum in signals:
                        if signum != signal.SIGHUP:
                            break
                        reloaded = reload_auth(config.path, auth)
                        if reloaded is not None:
                            auth = reloaded[1]
                            log.info(
                                "reloaded: now telling devices topic %s (%s); %d relayed"
                                " session(s) go on",
                                auth.topic,
                                auth.describe(),
                                the_relay.connections,
                            )
                log.info(
                    "stopping on %s: %d relayed session(s) end; their clients reconnect",
                    signal.Signals(signum).name,
                    the_relay.connections,
                )
                nursery.cancel_scope.cancel()
        finally:
            remove_socket(config.relay_socket, bound)
    finally:
        store.close()
