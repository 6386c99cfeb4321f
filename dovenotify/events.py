"""Events from Dovecot's Lua driver: the line format and its decoder (sans-I/O).

One event per line, UTF-8, TAB-separated, LF-terminated:
    <EventName> TAB <username> TAB <mailbox> TAB <service> [TAB <more fields>] LF
`%`, TAB, CR and LF inside username and mailbox are sent as %25, %09, %0D, %0A.
MailboxRename carries the old name as a fifth field. Other fields after the
fourth are ignored, so the script can grow without breaking us.
"""

from __future__ import annotations

import re

import attrs

MAX_LINE = 8192
# Only in spool files: the driver found its file full and kept no more. Its
# username field names who it was for; mailbox is empty.
SPOOL_FULL = "SpoolFull"
KNOWN_EVENTS = frozenset(
    {
        "MessageNew",
        "MessageAppend",
        "MessageExpunge",
        "FlagsSet",
        "FlagsClear",
        "MailboxCreate",
        "MailboxDelete",
        "MailboxRename",
        SPOOL_FULL,
    }
)
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


@attrs.frozen
class Event:
    name: str
    username: str
    mailbox: str
    service: str
    # MailboxRename only: the name before.
    old_mailbox: str = ""


@attrs.frozen
class BadLine:
    """A line that could not be used, with the reason for the log."""

    reason: str
    excerpt: str


def unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text) if "%" in text else text


def decode_line(raw: bytes) -> Event | BadLine:
    excerpt = raw[:80].decode("utf-8", "replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadLine("not UTF-8", excerpt)
    fields = text.rstrip("\r").split("\t")
    if len(fields) < 4:
        return BadLine(f"expected 4 fields, got {len(fields)}", excerpt)
    name, username, mailbox, service = fields[:4]
    if name not in KNOWN_EVENTS:
        return BadLine(f"unknown event {name!r}", excerpt)
    if not username:
        return BadLine("empty username", excerpt)
    old = unescape(fields[4]) if name == "MailboxRename" and len(fields) > 4 else ""
    return Event(name, unescape(username), unescape(mailbox), service, old)


class EventDecoder:
    """Splits a connection's bytes into events. Feed data; call `close()` at EOF."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()
        self._skipping = False  # inside an oversized line, dropping until its end

    def feed(self, data: bytes) -> list[Event | BadLine]:
        out: list[Event | BadLine] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line and not self._skipping:
                    out.append(BadLine(self._too_long(), _head(self._buffer)))
                    self._skipping = True
                if self._skipping:
                    self._buffer.clear()
                return out
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > self.max_line:
                out.append(BadLine(self._too_long(), _head(line)))
            elif line:
                out.append(decode_line(line))

    def _too_long(self) -> str:
        return f"line longer than {self.max_line} bytes"

    def close(self) -> list[BadLine]:
        """An unterminated last line was cut off by the sender's timeout: drop it."""
        if self._buffer and not self._skipping:
            problem = BadLine("incomplete last line (sender timed out?)", _head(self._buffer))
            self._buffer.clear()
            return [problem]
        return []


def _head(data: bytes | bytearray) -> str:
    return bytes(data[:80]).decode("utf-8", "replace")
