"""xapsd's HTTP API, so a site can swap xapsd for dovenotify before the C plugin.

The dovecot-xaps C plugin POSTs JSON to `/register` (from the IMAP command) and
`/notify` (from its push_notification driver). What it sends and expects, as
xapsd implements it (facts.md §6):

    /register {"ApsAccountId", "ApsDeviceToken", "ApsSubtopic", "Username", "Mailboxes"}
        200, body = the APNs topic as plain text (the plugin puts it in its IMAP
        answer); 400 on an empty field or a subtopic other than com.apple.mobilemail.
    /notify {"Username", "Mailbox", "Events"}
        200 handled, 204 the user is known but no device wants that mailbox,
        404 the user has no devices; 400 when a field is missing.

Field names match case-insensitively (Go's encoding/json does), and user names
are lowercased as xapsd does, so registrations imported from its database.json
keep matching. Parsing and answers are pure; `CompatApi` is the thin shell.
"""

from __future__ import annotations

import json
import logging
import pwd
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import trio

from .dispatch import wants
from .events import Event
from .httpserver import Request, Response
from .mailboxes import MailboxNameError, decode_all
from .peers import EventPolicy, Peer, Sender, tcp_peer_uid
from .relay import store_registration
from .store import Registration
from .xaps import MAX_ACCOUNT_ID_LENGTH, token_problem

log = logging.getLogger("dovenotify.compat")

SUBTOPIC = "com.apple.mobilemail"
# xapsd without an Events field pushed at once, as for new mail.
DEFAULT_EVENTS = ("MessageNew",)


class CompatError(ValueError):
    """A request the plugin should not have sent; answered 400 with this text."""


@attrs.frozen
class Register:
    username: str
    account_id: str
    device_token: str
    mailboxes: tuple[str, ...]


@attrs.frozen
class Notify:
    username: str
    mailbox: str
    events: tuple[str, ...]


def _fields(body: bytes) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except ValueError as e:
        raise CompatError(f"the body is not JSON: {e}") from None
    except RecursionError:
        raise CompatError("the body is JSON nested too deeply") from None
    if not isinstance(document, dict):
        raise CompatError("the body is not a JSON object")
    # Later duplicates win, as in encoding/json.
    return {str(k).lower(): v for k, v in document.items()}


def _text(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name.lower())
    if not isinstance(value, str) or not value:
        raise CompatError(f"{name} is missing or empty")
    return value


def _texts(fields: dict[str, Any], name: str, *, required: bool) -> tuple[str, ...] | None:
    value = fields.get(name.lower())
    if value is None and not required:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CompatError(f"{name} must be a non-empty list of strings")
    return tuple(value)


def parse_register(body: bytes) -> Register:
    fields = _fields(body)
    account_id = _text(fields, "ApsAccountId")
    device_token = _text(fields, "ApsDeviceToken")
    subtopic = _text(fields, "ApsSubtopic")
    username = _text(fields, "Username")
    mailboxes = _texts(fields, "Mailboxes", required=True)
    if subtopic != SUBTOPIC:
        raise CompatError(f"unknown ApsSubtopic {subtopic!r}, expected {SUBTOPIC}")
    problem = token_problem(device_token)
    if problem:
        raise CompatError(f"ApsDeviceToken {problem}")
    if len(account_id) > MAX_ACCOUNT_ID_LENGTH or not account_id.isprintable():
        raise CompatError("ApsAccountId is not a valid account id")
    assert mailboxes is not None
    try:
        # The plugin passes the names on as iOS spelled them: stored in UTF-8, as
        # the relay does.
        folders = decode_all(mailboxes)
    except MailboxNameError as e:
        raise CompatError(f"Mailboxes: {e}") from None
    return Register(username.lower(), account_id, device_token.lower(), folders)


def parse_notify(body: bytes) -> Notify:
    fields = _fields(body)
    username = _text(fields, "Username")
    mailbox = _text(fields, "Mailbox")
    events = _texts(fields, "Events", required=False) or DEFAULT_EVENTS
    return Notify(username.lower(), mailbox, events)


def notify_status(devices: Sequence[Registration], mailbox: str) -> int:
    if not devices:
        return 404
    if not any(wants(d, mailbox) for d in devices):
        return 204
    return 200


@attrs.define
class CompatApi:
    """Answers the plugin's requests with the service's store, topic and dispatcher."""

    topic: Callable[[], str]
    register: Callable[[Registration], Awaitable[None]]
    devices: Callable[[str], Awaitable[list[Registration]]]
    event: Callable[[Event], Awaitable[None]]
    # Who may ask for which user: the event socket's rule (peers.py).
    policy: EventPolicy
    user_key: Callable[[str], str]

    async def handle(self, request: Request) -> Response:
        if request.path not in ("/register", "/notify"):
            return Response(404, b"not found\n")
        if request.method != "POST":
            return Response(405, b"POST only\n")
        sender = await self._sender(request)
        if sender is None:
            return Response(403, b"only Dovecot's mail processes may use this API\n")
        try:
            call = (parse_register if request.path == "/register" else parse_notify)(request.body)
        except CompatError as e:
            log.warning("xapsd API: refused a %s request: %s", request.path, e)
            return Response(400, f"{e}\n".encode())
        if not sender.may_send_for(call.username, self.user_key):
            log.warning(
                "xapsd API: refused a %s request for %r from %s: only root, Dovecot's"
                " mail_uid and event_peers may ask for other users",
                request.path,
                call.username,
                sender.describe(),
            )
            return Response(403, b"not for that user\n")
        if isinstance(call, Register):
            return await self._register(call)
        return await self._notify(call)

    async def _sender(self, request: Request) -> Sender | None:
        uid = None
        if request.peer is not None and request.local is not None:
            uid = await trio.to_thread.run_sync(tcp_peer_uid, request.peer, request.local)
        if uid is None:
            log.warning("xapsd API: refused a request: cannot tell which local user sent it")
            return None
        sender = self.policy.sender(Peer(0, uid, _primary_gid(uid)))
        if sender.any_user or sender.own is not None:
            return sender
        log.warning("xapsd API: refused a request from uid %d, which has no account here", uid)
        return None

    async def _register(self, call: Register) -> Response:
        topic = self.topic()
        registration = Registration(
            username=call.username,
            account_id=call.account_id,
            device_token=call.device_token,
            topic=topic,
            mailboxes=call.mailboxes,
        )
        if not await store_registration(self.register, registration, via=" (xapsd API)"):
            return Response(500, b"the registration could not be stored\n")
        return Response(200, topic.encode())

    async def _notify(self, call: Notify) -> Response:
        status = notify_status(await self.devices(call.username), call.mailbox)
        if status == 200:
            for name in dict.fromkeys(call.events):
                # The plugin does not say which Dovecot service saw the change (it
                # runs in imap, lmtp and lda alike): name one whose events push.
                await self.event(
                    Event(name=name, username=call.username, mailbox=call.mailbox, service="imap")
                )
        return Response(status)


def _primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return -1
