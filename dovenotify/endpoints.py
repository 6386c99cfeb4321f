"""The optional HTTP endpoints of `dovenotify serve`: metrics/health and the xapsd API.

Wiring only: what each endpoint answers lives in metrics.py and compat.py.
Started with `nursery.start`, so a port that cannot be bound stops the service
before it reports ready, with a message naming the key.
"""

from __future__ import annotations

import logging
import os
import stat
from typing import TYPE_CHECKING

import trio

from .compat import CompatApi
from .config import Config
from .events import Event
from .httpserver import Handler, open_listeners, serve_http
from .metrics import MetricsApi, Samples
from .store import Registration

if TYPE_CHECKING:
    from .relay import Relay
    from .service import Service

log = logging.getLogger("dovenotify")

# xaps_register_callback does i_assert(size > 31) on the topic it reads back.
PLUGIN_MIN_TOPIC = 32


class EndpointError(ValueError):
    """A listen address that cannot be used (the CLI prints it without a traceback)."""


Endpoint = tuple[list[trio.SocketListener], Handler]


async def open_endpoints(service: Service, relay: Relay | None) -> list[Endpoint]:
    """Bind what the configuration asks for, before the service says it is ready."""
    config = service.config
    event_socket = _identity(config)

    async def sample() -> Samples:
        registrations = await trio.to_thread.run_sync(lambda: len(service.store.devices()))
        credentials = service.auth.credentials
        return Samples(
            pending_pushes=len(service.outbox) + len(service.dispatcher),
            registrations=registrations,
            # A separate `dovenotify relay` holds the sessions: not ours to count.
            relayed_connections=relay.connections if relay else None,
            certificate_days_left=credentials.days_left() if credentials else None,
            event_listener_problem=_listener_problem(config, event_socket),
        )

    async def devices(username: str) -> list[Registration]:
        key = service.usernames.key(username)
        return await trio.to_thread.run_sync(service.store.devices, key)

    async def event(e: Event) -> None:
        await service.handle_event(e)

    wanted: list[tuple[str, tuple[str, int] | None, Handler]] = [
        ("metrics_listen", config.metrics_listen, MetricsApi(service.metrics, sample).handle),
        (
            "compat_listen",
            config.compat_listen,
            CompatApi(
                lambda: service.topic,
                service.register,
                devices,
                event,
                service.event_policy,
                service.usernames.key,
            ).handle,
        ),
    ]
    if config.compat_listen is not None and len(service.topic.encode()) < PLUGIN_MIN_TOPIC:
        log.warning(
            "compat_listen: the topic %s is shorter than %d bytes, which the dovecot-xaps"
            " C plugin rejects with an assertion (its imap process dies); replace the"
            " plugin by dovenotify's Dovecot configuration before using this topic",
            service.topic,
            PLUGIN_MIN_TOPIC,
        )
    opened: list[Endpoint] = []
    for key, address, handler in wanted:
        if address is None:
            continue
        host, port = address
        try:
            listeners = await open_listeners(host, port)
        except OSError as e:
            for listeners, _ in opened:
                for listener in listeners:
                    await listener.aclose()
            raise EndpointError(f"{key}: cannot listen on {host}:{port}: {e.strerror}") from e
        log.info("%s: serving on %s:%d", key, host, port)
        opened.append((listeners, handler))
    return opened


async def serve_endpoints(endpoints: list[Endpoint], limit: int) -> None:
    """Each endpoint serves at most `limit` connections at once (http_connections)."""
    async with trio.open_nursery() as nursery:
        for listeners, handler in endpoints:
            nursery.start_soon(serve_http, listeners, handler, limit)


def _identity(config: Config) -> tuple[int, int] | None:
    try:
        st = os.stat(config.event_socket)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _listener_problem(config: Config, bound: tuple[int, int] | None) -> str | None:
    """The event socket must still be the one we listen on: a cleaned-up /run or a
    second instance takes it away from Dovecot's view without telling us."""
    path = config.event_socket
    try:
        st = os.stat(path)
    except OSError as e:
        return f"the event socket {path} is gone ({e.strerror}): Dovecot's events are lost"
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != bound:
        return f"the event socket {path} was replaced: Dovecot's events go elsewhere"
    return None
