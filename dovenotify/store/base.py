"""Registrations: what each device asked to be pushed for, and the store's interface.

A registration is keyed by (username, account id, device token): two iPhones
restored from one backup share an account id but not a token, and both must get
pushes. `Store` is what the relay, the service and the CLI use; sqlite.py and
postgres.py implement it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import attrs

# 2: mailbox names are stored in UTF-8, no longer as the client spelled them.
SCHEMA_VERSION = 2


COLUMNS = (
    "username, account_id, device_token, topic, mailboxes, registered_at,"
    " last_push_at, last_push_result"
)


class StoreError(Exception):
    """The registration database cannot be used; the message says why."""


@attrs.frozen
class Registration:
    username: str
    account_id: str
    device_token: str
    topic: str
    mailboxes: tuple[str, ...]
    registered_at: float = attrs.field(factory=time.time)
    last_push_at: float | None = None
    last_push_result: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.username, self.account_id, self.device_token)

    def as_json(self) -> dict[str, object]:
        return {
            "username": self.username,
            "account_id": self.account_id,
            "device_token": self.device_token,
            "topic": self.topic,
            "mailboxes": list(self.mailboxes),
            "registered_at": iso(self.registered_at),
            "last_push_at": iso(self.last_push_at) if self.last_push_at else None,
            "last_push_result": self.last_push_result,
        }


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


class Store(Protocol):
    """What the service and the CLI use; SQLiteStore and postgres.PostgresStore."""

    def register(self, reg: Registration) -> None: ...
    def devices(self, username: str | None = None) -> list[Registration]: ...
    def record_push(self, key: tuple[str, str, str], at: float, result: str) -> None: ...
    def remove(
        self,
        *,
        username: str | None = None,
        account_id: str | None = None,
        device_token: str | None = None,
        registered_before: float | None = None,
    ) -> list[Registration]: ...
    def close(self) -> None: ...


def short_token(token: str) -> str:
    """A device token as logs and listings show it: enough to tell devices apart."""
    return token[:8] + "…" if len(token) > 8 else token


def who(device: Registration) -> str:
    """A registration as logs name it."""
    return f"{device.username} device {short_token(device.device_token)}"


def criteria(
    username: str | None,
    account_id: str | None,
    device_token: str | None,
    registered_before: float | None,
) -> tuple[str, Sequence[object]]:
    """The WHERE clause of a removal, and its arguments; never an empty one."""
    parts: list[str] = []
    args: list[object] = []
    for column, value in (
        ("username = ?", username),
        ("account_id = ?", account_id),
        ("device_token = ?", device_token.lower() if device_token else None),
        ("registered_at < ?", registered_before),
    ):
        if value is not None:
            parts.append(column)
            args.append(value)
    if not parts:
        raise ValueError("refusing to remove every registration at once")
    return " AND ".join(parts), args
