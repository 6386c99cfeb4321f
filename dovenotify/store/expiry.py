"""Registrations that devices stopped renewing: ignored once older than the TTL, then swept.

iOS registers again at every connection, so a registration that has not been
renewed for `registration_ttl` belongs to a device that is gone or no longer
wants push. Ignoring old ones when pushing makes the TTL exact; the sweep only
keeps the database from growing.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

import trio

from dovenotify.store.base import Registration, Store, short_token

log = logging.getLogger("dovenotify.registrations")

SWEEP_INTERVAL = 3600.0


def unexpired(devices: Iterable[Registration], ttl: float, now: float) -> list[Registration]:
    """The registrations renewed within the last `ttl` seconds."""
    return [d for d in devices if d.registered_at > now - ttl]


async def sweep_expired(store: Store, ttl: float, interval: float = SWEEP_INTERVAL) -> None:
    """Delete expired registrations now and every `interval` seconds."""
    while True:
        remove = functools.partial(store.remove, registered_before=time.time() - ttl)
        removed = await trio.to_thread.run_sync(remove)
        for r in removed:
            log.info(
                "expired %s account %s device %s: not renewed for %g days",
                r.username,
                r.account_id,
                short_token(r.device_token),
                ttl / 86400,
            )
        await trio.sleep(interval)
