"""Mailbox names: IMAP's modified UTF-7 (RFC 3501 5.1.3) and how names are compared (pure).

iOS registers mailboxes as IMAP spells them on the wire: `Entw&APw-rfe`. Dovecot's
events carry the same name in UTF-8: `Entwürfe`. Registrations are decoded once,
when they arrive, and stored and compared in UTF-8; the client's own spelling is
only echoed back in the confirmation.

A name with a character outside ASCII cannot be modified UTF-7, so it is taken as
the UTF-8 it already is (a client that sends UTF-8, as RFC 6855's UTF8=ACCEPT
allows). Dovecot 2.3.19 and 2.4.1 do not offer UTF8=ACCEPT (2.4.1 has no
`mail_utf8` either), so an ASCII name is always modified UTF-7.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable

# The modified BASE64 alphabet: "," instead of "/", no padding.
_BASE64 = re.compile(r"[A-Za-z0-9+,]+")


class MailboxNameError(ValueError):
    """The name is not valid modified UTF-7; the message says why."""


def encode(name: str) -> str:
    """`name` in modified UTF-7, the one spelling RFC 3501 allows."""
    out: list[str] = []
    pending: list[str] = []
    for char in name:
        if " " <= char <= "~":
            out.append(_shifted(pending))
            pending.clear()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    out.append(_shifted(pending))
    return "".join(out)


def _shifted(chars: list[str]) -> str:
    if not chars:
        return ""
    raw = "".join(chars).encode("utf-16-be")
    return "&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-"


def decode(name: str) -> str:
    """The UTF-8 name for a client's spelling; MailboxNameError if it is malformed.

    Only the canonical spelling is accepted (the one `encode` gives, which is what
    Dovecot lists), so each UTF-8 name has one wire spelling and back.
    """
    if not name.isascii():
        return name
    out: list[str] = []
    i = 0
    while i < len(name):
        start = name.find("&", i)
        if start < 0:
            out.append(name[i:])
            break
        out.append(name[i:start])
        end = name.find("-", start + 1)
        if end < 0:
            raise MailboxNameError(f"{name[start:]!r} starts an encoded part but has no closing -")
        out.append(_unshifted(name[start + 1 : end]) if end > start + 1 else "&")
        i = end + 1
    decoded = "".join(out)
    if "\0" in decoded:
        raise MailboxNameError("it encodes a NUL character")
    if encode(decoded) != name:
        if not all(" " <= c <= "~" for c in name):
            raise MailboxNameError("it contains a control character")
        raise MailboxNameError(f"it is not in its canonical form, which is {encode(decoded)!r}")
    return decoded


def decode_all(spelled: Iterable[str]) -> tuple[str, ...]:
    """Each name decoded, duplicates dropped; MailboxNameError names the first malformed one."""
    folders = []
    for name in spelled:
        try:
            folders.append(decode(name))
        except MailboxNameError as e:
            raise MailboxNameError(f'"{name}" is not valid modified UTF-7: {e}') from None
    return tuple(dict.fromkeys(folders))


def _unshifted(encoded: str) -> str:
    if not _BASE64.fullmatch(encoded):
        raise MailboxNameError(f"{encoded!r} is not modified BASE64")
    try:
        raw = base64.b64decode(encoded.replace(",", "/") + "=" * (-len(encoded) % 4))
        if len(raw) % 2:
            raise ValueError
        return raw.decode("utf-16-be")
    except (binascii.Error, ValueError):
        raise MailboxNameError(f"&{encoded}- is not UTF-16") from None


def key(name: str) -> str:
    """What two names are compared by: INBOX and its subfolders match in any case.

    Dovecot itself upper-cases an "INBOX" followed by the hierarchy separator, so
    its events carry `INBOX/Sub` for a client's `inbox/Sub`. The separator is the
    namespace's (often `/` or `.`) and unknown here: any character that cannot be
    part of a word is taken as one. This can only add a push (for a second folder
    named like `inbox.Sub` beside `INBOX.Sub` where `.` is no separator), never
    lose one, and an extra push costs the phone a sync.
    """
    if name[:5].upper() == "INBOX" and (len(name) == 5 or not name[5].isalnum()):
        return "INBOX" + name[5:]
    return name


def upgrade(stored: list[str]) -> list[str]:
    """Names stored before dovenotify decoded them (as the client spelled them), in
    UTF-8. A name that does not decode is kept as it is: it may be UTF-8 already."""
    upgraded = []
    for name in stored:
        try:
            upgraded.append(decode(name))
        except MailboxNameError:
            upgraded.append(name)
    return list(dict.fromkeys(upgraded))
