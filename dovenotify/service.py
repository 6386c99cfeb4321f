"""`dovenotify serve`: builds the parts from the configuration and runs them in one nursery.

The parts are the relay (relay/, unless `dovenotify relay` holds it), the event
intake (push/intake.py and spooling.py: socket, spool, dispatcher), the sending loop
(push/sending.py: outbox, APNs), the HTTP endpoints (admin/) and the expiry
sweep (store/). Signals: SIGTERM/SIGINT stop accepting, push whatever is pending
(delayed pushes included) for up to `drain_timeout` seconds, then exit. SIGHUP
loads the APNs credentials again (a replaced certificate) and resumes sending if
it was paused.
"""

from __future__ import annotations

import functools
import logging
import signal

import trio

from dovenotify.admin.compat import CompatApi
from dovenotify.admin.endpoints import Gauges, open_endpoints, serve_endpoints
from dovenotify.admin.metrics import Metrics
from dovenotify.apns.auth import load_auth, open_sender
from dovenotify.apns.outbox import Outbox
from dovenotify.core import directories
from dovenotify.core.config import Config
from dovenotify.core.sockets import notify_ready, remove_socket, socket_file, unix_listener
from dovenotify.core.usernames import UserKeys
from dovenotify.events import spool
from dovenotify.events.dispatch import Dispatcher
from dovenotify.events.peers import EventPolicy
from dovenotify.push import Intake, Sending
from dovenotify.push.spooling import SpoolReader
from dovenotify.relay.listen import open_relay, register_keyed
from dovenotify.store.backends import open_store
from dovenotify.store.base import Registration, Store
from dovenotify.store.expiry import sweep_expired

log = logging.getLogger("dovenotify")


async def serve(config: Config) -> None:
    directories.check(config)
    auth = load_auth(config.apns)
    store = open_store(config.database)
    usernames = UserKeys(config.username_format, config.default_domain)
    sending = Sending(
        config=config,
        store=store,
        sender=open_sender(config.apns, auth),
        auth=auth,
        dispatcher=Dispatcher(delay=config.delay, max_delay=config.max_delay),
        metrics=Metrics(),
        outbox=Outbox(retry_deadline=config.retry_deadline),
    )
    intake = Intake(
        config=config,
        store=store,
        sending=sending,
        usernames=usernames,
        event_policy=EventPolicy.build(config.event_peers),
    )
    register = functools.partial(
        register_keyed,
        store,
        usernames,
        per_user=config.registrations_per_user,
        mailboxes=config.mailboxes_per_registration,
    )
    sending.check_expiry()
    # relay_process: separate leaves the relay socket, and its sessions, to `dovenotify relay`.
    the_relay, relayed = None, None
    if config.relay_process == "inline":
        the_relay, relayed = open_relay(config, lambda: sending.topic, register)
    events = unix_listener(config.event_socket, 0o666)
    sockets = [config.event_socket, *([config.relay_socket] if the_relay else [])]
    bound = {path: socket_file(path) for path in sockets}
    gauges = Gauges(
        store=store,
        pending=sending.__len__,
        credentials=lambda: sending.auth.credentials,
        # A separate `dovenotify relay` holds the sessions: not ours to count.
        relayed=(lambda: the_relay.connections) if the_relay else None,
    )
    endpoints = await open_endpoints(
        config,
        sending.metrics,
        gauges,
        CompatApi(
            lambda: sending.topic,
            register,
            functools.partial(_devices, store, usernames),
            intake.handle_event,
            intake.event_policy,
            usernames.key,
        ),
        sending.topic,
    )
    try:
        problem = spool.create(config.event_spool)
    except OSError as e:
        problem = (
            f"cannot create the event spool {config.event_spool} ({e.strerror or e}):"
            " the Lua driver sends every event to the event socket instead, which costs"
            " each delivery more, and what it sends while dovenotify is down is lost"
        )
    if problem:
        log.warning("%s", problem)
        intake.spool_files = False
    try:
        # The sender's connection runs in its own nursery, closed after this one.
        async with sending.sender, trio.open_nursery() as nursery:
            nursery.start_soon(intake.serve_events, events)
            if the_relay is not None:
                nursery.start_soon(the_relay.serve, relayed)
            nursery.start_soon(sending.run_sender)
            nursery.start_soon(serve_endpoints, endpoints, config.http_connections)
            nursery.start_soon(sweep_expired, store, config.registration_ttl)
            nursery.start_soon(sending.watch_expiry)
            nursery.start_soon(SpoolReader(intake).run)
            log.info(
                "dovenotify is running: events in %s and on %s, relay %s, %s, APNs %s",
                config.event_spool,
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
                        await sending.reload()
                        continue
                    log.info("stopping on %s", signal.Signals(signum).name)
                    break
            await sending.drain()
            nursery.cancel_scope.cancel()
    finally:
        for path in sockets:
            remove_socket(path, bound[path])
        store.close()


async def _devices(store: Store, usernames: UserKeys, username: str) -> list[Registration]:
    return await trio.to_thread.run_sync(store.devices, usernames.key(username))
