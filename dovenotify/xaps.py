"""XAPPLEPUSHSERVICE: parse what iOS sends, format what the server answers (sans-I/O).

iOS sends (facts.md §1):
    A12 XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" "…" "aps-device-token" "…"
        "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Notes")
Older clients use atoms instead of quoted strings; keys are case-insensitive, in any
order, and unknown keys are ignored.
"""

from __future__ import annotations

import re

import attrs

from . import mailboxes as names

SUBTOPIC = "com.apple.mobilemail"
MAX_TOKEN_LENGTH = 200
MAX_ACCOUNT_ID_LENGTH = 200
HEX = re.compile(r"[0-9A-Fa-f]+")
ATOM_END = frozenset(b' ()"\r\n')


class XapsError(ValueError):
    """The command is malformed; the message says how, for the BAD answer."""


@attrs.frozen
class Request:
    account_id: str
    device_token: str
    subtopic: str
    # As the client spelled them, for the confirmation it expects.
    mailboxes: tuple[str, ...]
    # The same in UTF-8, as Dovecot's events name them: what is stored and compared.
    folders: tuple[str, ...]


Value = str | list["Value"]


def parse(line: bytes) -> Request:
    """Parse a whole command line (tag and command name included, no CRLF)."""
    parts = line.split(b" ", 2)
    if len(parts) < 2:
        raise XapsError("the command has no arguments")
    args = _tokens(parts[2] if len(parts) == 3 else b"")
    if len(args) % 2:
        raise XapsError("the arguments must come in key/value pairs")
    given: dict[str, Value] = {}
    for key, value in zip(args[::2], args[1::2], strict=True):
        if not isinstance(key, str):
            raise XapsError("a key must be a string, not a list")
        given[key.lower()] = value
    return _request(given)


def _request(given: dict[str, Value]) -> Request:
    version = _text(given, "aps-version")
    if version != "2":
        raise XapsError(f"aps-version {version} is not supported; only version 2 is")
    account_id = _text(given, "aps-account-id")
    if len(account_id) > MAX_ACCOUNT_ID_LENGTH or not account_id.isprintable():
        raise XapsError("aps-account-id is not a valid account id")
    token = _text(given, "aps-device-token")
    problem = token_problem(token)
    if problem:
        raise XapsError(f"aps-device-token {problem}")
    subtopic = _text(given, "aps-subtopic")
    if subtopic != SUBTOPIC:
        raise XapsError(f"aps-subtopic must be {SUBTOPIC}")
    mailboxes = given.get("mailboxes")
    if mailboxes is None:
        raise XapsError("mailboxes is missing")
    if not isinstance(mailboxes, list) or not mailboxes:
        raise XapsError("mailboxes must be a non-empty list")
    if not all(isinstance(m, str) and m for m in mailboxes):
        raise XapsError("mailboxes must be a list of mailbox names")
    spelled = tuple(dict.fromkeys(m for m in mailboxes if isinstance(m, str)))
    try:
        folders = names.decode_all(spelled)
    except names.MailboxNameError as e:
        raise XapsError(f"mailbox {e}") from None
    return Request(account_id, token.lower(), subtopic, spelled, folders)


def token_problem(token: str) -> str | None:
    """What is wrong with a device token, if anything: APNs takes whole bytes in hex,
    at most 100 of them (today's are 32)."""
    if len(token) > MAX_TOKEN_LENGTH:
        return f"is longer than {MAX_TOKEN_LENGTH} characters"
    if not HEX.fullmatch(token) or len(token) % 2:
        return "must be hexadecimal, two digits per byte"
    return None


def _text(given: dict[str, Value], key: str) -> str:
    value = given.get(key)
    if value is None:
        raise XapsError(f"{key} is missing")
    if not isinstance(value, str):
        raise XapsError(f"{key} must be a string, not a list")
    if not value:
        raise XapsError(f"{key} is empty")
    return value


def _tokens(data: bytes) -> list[Value]:
    """IMAP atoms, quoted strings and parenthesised lists, as nested Python lists."""
    stack: list[list[Value]] = [[]]
    i, n = 0, len(data)
    while i < n:
        c = data[i : i + 1]
        if c == b" ":
            i += 1
        elif c == b"(":
            stack.append([])
            i += 1
        elif c == b")":
            if len(stack) == 1:
                raise XapsError("unbalanced parentheses")
            inner = stack.pop()
            stack[-1].append(inner)
            i += 1
        elif c == b'"':
            value, i = _quoted(data, i + 1)
            stack[-1].append(value)
        else:
            start = i
            while i < n and data[i] not in ATOM_END:
                i += 1
            if i == start:
                raise XapsError("unexpected character in the arguments")
            stack[-1].append(_decode(data[start:i]))
    if len(stack) != 1:
        raise XapsError("unbalanced parentheses")
    return stack[0]


def _quoted(data: bytes, i: int) -> tuple[str, int]:
    out = bytearray()
    while i < len(data):
        c = data[i]
        if c == 0x5C and i + 1 < len(data):  # backslash escapes " and \
            out.append(data[i + 1])
            i += 2
        elif c == 0x22:
            return _decode(bytes(out)), i + 1
        else:
            out.append(c)
            i += 1
    raise XapsError("a quoted string is not closed")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XapsError("the arguments are not valid UTF-8") from None


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def answer(tag: bytes, topic: str, mailboxes: tuple[str, ...]) -> bytes:
    """The reply iOS expects: one line per confirmed mailbox, then version and topic."""
    lines = [f"* XAPPLEPUSHSERVICE {quote('mailbox')} {quote(m)}" for m in mailboxes]
    lines.append(f'* XAPPLEPUSHSERVICE aps-version "2" aps-topic {quote(topic)}')
    lines.append("")
    return "\r\n".join(lines).encode("utf-8") + _tagged(tag, "OK XAPPLEPUSHSERVICE completed.")


def bad(tag: bytes, problem: str) -> bytes:
    return _tagged(tag, f"BAD XAPPLEPUSHSERVICE: {problem}.")


def no(tag: bytes, problem: str) -> bytes:
    return _tagged(tag, f"NO [UNAVAILABLE] XAPPLEPUSHSERVICE: {problem}.")


def _tagged(tag: bytes, text: str) -> bytes:
    return tag + b" " + text.encode("utf-8") + b"\r\n"
