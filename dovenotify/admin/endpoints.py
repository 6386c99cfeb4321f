"""The optional HTTP endpoints of `dovenotify serve`: metrics/health and the xapsd API.

Wiring only: what each endpoint answers lives in metrics.py and compat.py; the
service hands in where the gauges are read from.
Started with `nursery.start`, so a port that cannot be bound stops the service
before it reports ready, with a message naming the key.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable

import attrs
import trio

from dovenotify.admin.compat import CompatApi
from dovenotify.admin.httpserver import Handler, open_listeners, serve_http
from dovenotify.admin.metrics import Metrics, MetricsApi, Samples
from dovenotify.apns.certificates import Credentials
from dovenotify.core.config import Config
from dovenotify.core.sockets import socket_file
from dovenotify.store.base import Store

log = logging.getLogger("dovenotify")

# xaps_register_callback does i_assert(size > 31) on the topic it reads back.
PLUGIN_MIN_TOPIC = 32


class EndpointError(ValueError):
    """A listen address that cannot be used (the CLI prints it without a traceback)."""


Endpoint = tuple[list[trio.SocketListener], Handler]


@attrs.frozen
class Gauges:
    """Where the gauges are read from, at scrape time, so they cannot drift."""

    store: Store
    # Pushes not yet answered, delayed ones included.
    pending: Callable[[], int]
    credentials: Callable[[], Credentials | None]
    # None when a separate `dovenotify relay` holds the sessions: not ours to count.
    relayed: Callable[[], int] | None


async def open_endpoints(
    config: Config, metrics: Metrics, gauges: Gauges, compat: CompatApi, topic: str
) -> list[Endpoint]:
    """Bind what the configuration asks for, before the service says it is ready."""
    event_socket = socket_file(config.event_socket)

    async def sample() -> Samples:
        registrations = await trio.to_thread.run_sync(lambda: len(gauges.store.devices()))
        credentials = gauges.credentials()
        return Samples(
            pending_pushes=gauges.pending(),
            registrations=registrations,
            relayed_connections=gauges.relayed() if gauges.relayed else None,
            certificate_days_left=credentials.days_left() if credentials else None,
            event_listener_problem=_listener_problem(config, event_socket),
        )

    wanted: list[tuple[str, tuple[str, int] | None, Handler]] = [
        ("metrics_listen", config.metrics_listen, MetricsApi(metrics, sample).handle),
        ("compat_listen", config.compat_listen, compat.handle),
    ]
    if config.compat_listen is not None and len(topic.encode()) < PLUGIN_MIN_TOPIC:
        log.warning(
            "compat_listen: the topic %s is shorter than %d bytes, which the dovecot-xaps"
            " C plugin rejects with an assertion (its imap process dies); replace the"
            " plugin by dovenotify's Dovecot configuration before using this topic",
            topic,
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
