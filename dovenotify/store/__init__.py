"""Registrations: one interface (`Store`), SQLite and PostgreSQL behind it, and expiry.

`open_store` picks the implementation from the `database` setting; the
PostgreSQL driver is loaded only when it is asked for.
"""

from dovenotify.store.backends import open_store
from dovenotify.store.base import SCHEMA_VERSION, Registration, Store, StoreError, iso, short_token
from dovenotify.store.expiry import sweep_expired, unexpired

__all__ = [
    "SCHEMA_VERSION",
    "Registration",
    "Store",
    "StoreError",
    "iso",
    "open_store",
    "short_token",
    "sweep_expired",
    "unexpired",
]
