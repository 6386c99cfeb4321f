"""APNs requests and answers, without I/O.

`build_request` turns a `Push` into the path, headers and body APNs expects, and
`classify` turns APNs's answer (status and body) into what the caller should do
about the registration. The HTTP/2 client around them is `sender.ApnsSender`.
"""

from __future__ import annotations

import enum
import json
import math
import re

import attrs

PRODUCTION = "https://api.push.apple.com"
SANDBOX = "https://api.sandbox.push.apple.com"

_HEX = re.compile(r"[0-9A-Fa-f]+")


def _hex_token(_instance: object, _attribute: object, value: str) -> None:
    # The token becomes part of the request path: anything but hex could change it.
    if not _HEX.fullmatch(value):
        raise ValueError(f"device token must be hex, got {value!r}")


@attrs.frozen
class Push:
    device_token: str = attrs.field(validator=_hex_token)
    topic: str
    account_id: str
    push_type: str = "background"
    expiration_seconds: int = 86400
    # Mail senders send none; APNs then uses 10, or 5 for background pushes.
    priority: int | None = None


@attrs.frozen
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


def build_request(push: Push, now: float) -> Request:
    """The APNs request for `push`; `now` is epoch seconds (for apns-expiration)."""
    headers = {
        "apns-topic": push.topic,
        "apns-push-type": push.push_type,
        "apns-expiration": str(int(now) + push.expiration_seconds),
    }
    if push.priority is not None:
        headers["apns-priority"] = str(push.priority)
    body = json.dumps({"aps": {"account-id": push.account_id}}, separators=(",", ":"))
    return Request(f"/3/device/{push.device_token}", headers, body.encode())


class Action(enum.Enum):
    DELIVERED = "delivered"
    # The token is dead: forget registrations older than Outcome.timestamp_ms (if any).
    DROP_TOKEN = "drop_token"
    # Registered under another topic (certificate changed): keep it until the device
    # registers again, but do not push to it.
    TOKEN_NOT_FOR_TOPIC = "token_not_for_topic"
    # Transient: try again later, with backoff.
    RETRY = "retry"
    # Our setup is wrong (certificate, topic, request): alert, do not retry per push.
    CONFIG_ERROR = "config_error"


@attrs.frozen
class Outcome:
    action: Action
    # None when no answer came (transport failure).
    status: int | None
    # APNs's reason string, or a description of the transport failure.
    reason: str = ""
    # On 410: when APNs learnt the token was invalid, in ms since the epoch.
    timestamp_ms: int | None = None
    # APNs echoes an apns-id header identifying the notification; useful in logs.
    apns_id: str | None = None

    @property
    def retryable(self) -> bool:
        return self.action is Action.RETRY


UNPARSEABLE = "unparseable answer"

_DROP_400 = frozenset({"BadDeviceToken"})
_NOT_FOR_TOPIC_400 = frozenset({"DeviceTokenNotForTopic"})
_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


def classify(status: int, body: bytes, apns_id: str | None = None) -> Outcome:
    """What to do after APNs answered `status` with `body`."""
    if status == 200:
        return Outcome(Action.DELIVERED, status, apns_id=apns_id)
    reason, timestamp_ms = _parse_error(body)
    if status == 410 or (status == 400 and reason in _DROP_400):
        action = Action.DROP_TOKEN
    elif status == 400 and reason in _NOT_FOR_TOPIC_400:
        action = Action.TOKEN_NOT_FOR_TOPIC
    elif status in _RETRY_STATUSES or 500 <= status < 600:
        action = Action.RETRY
    else:
        # 400 (bad topic, push type, headers...), 403 (certificate), 404, 405, 413, and
        # anything APNs does not document: retrying the same request cannot help.
        action = Action.CONFIG_ERROR
    if status != 410:
        timestamp_ms = None
    return Outcome(action, status, reason, timestamp_ms, apns_id)


def transport_failure(description: str) -> Outcome:
    """No answer (connection refused or lost, GOAWAY, timeout): always worth a retry."""
    return Outcome(Action.RETRY, None, description)


def _parse_error(body: bytes) -> tuple[str, int | None]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # RecursionError: brackets nested deeper than Python's stack, e.g. "[[[[…".
        return UNPARSEABLE, None
    if not isinstance(document, dict) or not isinstance(document.get("reason"), str):
        return UNPARSEABLE, None
    timestamp = document.get("timestamp")
    # JSON allows 1e999 (infinity to Python): int() of it would raise.
    if (
        isinstance(timestamp, bool)
        or not isinstance(timestamp, int | float)
        or not math.isfinite(timestamp)
    ):
        timestamp = None
    return document["reason"], None if timestamp is None else int(timestamp)
