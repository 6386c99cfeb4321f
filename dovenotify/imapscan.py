"""Sans-I/O scanners for the two directions of a relayed IMAP connection.

The relay must find a handful of client commands (XAPPLEPUSHSERVICE, COMPRESS) and
otherwise forward every byte unchanged and in order. IMAP literals (`{n}`, `{n+}`,
`~{n}`) carry arbitrary bytes, so both scanners count them out instead of looking
inside; that keeps a 50 MB APPEND or FETCH a matter of slicing, not parsing.

Neither class touches a socket: feed bytes in, get what to do back. Forwarded data
is returned as memoryview slices of the input, so nothing large is copied.
"""

from __future__ import annotations

import re

import attrs

# Longest command head we look at to decide whether a line is ours. Tags and
# command names are short; anything longer is somebody else's business.
HEAD_LIMIT = 256
# Longest intercepted command kept in memory. iOS sends about 250 bytes.
COMMAND_LIMIT = 16 * 1024
# Enough of a line's end to recognise a literal marker such as `~{12345678901}\r\n`.
TAIL = 32

LITERAL_AT_END = re.compile(rb"~?\{(\d{1,20})(\+?)\}\r?\n\Z")
HEAD = re.compile(rb"([^ \r\n]+) ([A-Za-z]+)[ \r\n]")


@attrs.frozen
class Forward:
    """Bytes to pass on unchanged."""

    data: bytes | memoryview


@attrs.frozen
class Intercepted:
    """A whole client command that the relay answers itself.

    `line` is the command without its CRLF (and without any literal); `problem` is
    set when it could not be taken whole: too long, or it carried a literal.
    """

    tag: bytes
    command: str
    line: bytes
    problem: str | None = None


Action = Forward | Intercepted


class ClientScanner:
    """Scans the client→server stream for the commands named in `intercept`."""

    def __init__(self, intercept: frozenset[str] = frozenset({"XAPPLEPUSHSERVICE"})) -> None:
        self._intercept = frozenset(name.upper() for name in intercept)
        self._head = bytearray()  # start of a line whose fate is undecided
        self._in_line = False  # forwarding the rest of a line that is not ours
        self._tail = b""  # end of that line so far, to spot a literal marker
        self._literal = 0  # literal bytes still to pass (or skip, when capturing)
        self._captured: bytearray | None = None  # an intercepted command being read
        self._tag = b""
        self._command = ""
        self._problem: str | None = None

    def feed(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        self._run(data, actions)
        return actions

    def _run(self, data: bytes, actions: list[Action]) -> None:
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self._literal:
                n = min(self._literal, size - pos)
                self._literal -= n
                if self._captured is None:
                    actions.append(Forward(view[pos : pos + n]))
                pos += n
            elif self._captured is not None:
                pos = self._capture(data, pos, actions)
            elif self._in_line:
                pos = self._pass_line(data, view, pos, actions)
            else:
                pos = self._decide(data, pos, actions)

    def _decide(self, data: bytes, pos: int, actions: list[Action]) -> int:
        take = data[pos : pos + HEAD_LIMIT - len(self._head)]
        newline = take.find(b"\n")
        if newline >= 0:
            take = take[: newline + 1]
        self._head += take
        pos += len(take)
        match = HEAD.match(self._head)
        if match is None and newline < 0 and len(self._head) < HEAD_LIMIT:
            return pos  # wait for more of the head
        head, self._head = bytes(self._head), bytearray()
        if match and match.group(2).upper().decode() in self._intercept:
            self._captured = bytearray()
            self._tag, self._command = match.group(1), match.group(2).upper().decode()
            self._problem = None
        else:
            self._in_line, self._tail = True, b""
        self._run(head, actions)
        return pos

    def _pass_line(self, data: bytes, view: memoryview, pos: int, actions: list[Action]) -> int:
        end = data.find(b"\n", pos)
        stop = len(data) if end < 0 else end + 1
        actions.append(Forward(view[pos:stop]))
        self._tail = (self._tail + data[max(pos, stop - TAIL) : stop])[-TAIL:]
        if end >= 0:
            literal = LITERAL_AT_END.search(self._tail)
            self._literal = int(literal.group(1)) if literal else 0
            self._in_line = literal is not None  # the command goes on after its literal
            self._tail = b""
        return stop

    def _capture(self, data: bytes, pos: int, actions: list[Action]) -> int:
        assert self._captured is not None
        end = data.find(b"\n", pos)
        stop = len(data) if end < 0 else end + 1
        if len(self._captured) + stop - pos > COMMAND_LIMIT:
            self._problem = "the command line is too long"
            # Keep only the end: enough to still see a literal marker there.
            self._captured = self._captured[-TAIL:]
        self._captured += data[max(pos, stop - COMMAND_LIMIT) : stop]
        if end < 0:
            return stop
        literal = LITERAL_AT_END.search(self._captured)
        if literal is None:
            self._finish_capture(actions)
            return stop
        self._problem = self._problem or "literals are not supported in this command"
        size, non_synchronizing = int(literal.group(1)), bool(literal.group(2))
        del self._captured[literal.start() :]
        if non_synchronizing:
            # That literal comes anyway: skip it and read on.
            self._literal = size
        else:
            # A synchronizing one waits for a go-ahead it will not get; the
            # answer goes out now.
            self._finish_capture(actions)
        return stop

    def _finish_capture(self, actions: list[Action]) -> None:
        assert self._captured is not None
        line = bytes(self._captured).rstrip(b"\r\n")
        actions.append(Intercepted(self._tag, self._command, line, self._problem))
        self._captured = None


class ServerScanner:
    """Scans the server→client stream so that chosen tagged replies can be swapped.

    The relay sends a placeholder command under a tag of its own and asks, with
    `replace`, that the server's tagged reply to it be swapped for its own answer.
    That keeps pipelined replies in command order without holding anything back.
    """

    def __init__(self) -> None:
        self._pending: dict[bytes, bytes] = {}
        self._literal = 0
        self._at_line_start = True
        self._line: bytearray | None = None  # a line held back to check its tag
        self._tail = b""

    def replace(self, tag: bytes, answer: bytes) -> None:
        self._pending[tag + b" "] = answer

    @property
    def pending(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self._literal:
                n = min(self._literal, size - pos)
                self._literal -= n
                out.append(view[pos : pos + n])
                pos += n
                continue
            end = data.find(b"\n", pos)
            stop = size if end < 0 else end + 1
            if self._line is None and self._at_line_start and self._pending:
                self._line = bytearray()
            self._at_line_start = False
            if self._line is not None:
                self._line += data[pos:stop]
                if end >= 0:
                    line, self._line = bytes(self._line), None
                    out.append(self._swap(line))
                    self._line_ended(line[-TAIL:])
            else:
                out.append(view[pos:stop])
                self._tail = (self._tail + data[max(pos, stop - TAIL) : stop])[-TAIL:]
                if end >= 0:
                    self._line_ended(self._tail)
            pos = stop
        return out

    def _swap(self, line: bytes) -> bytes:
        for prefix, answer in self._pending.items():
            if line.startswith(prefix):
                del self._pending[prefix]
                return answer
        return line

    def _line_ended(self, tail: bytes) -> None:
        literal = LITERAL_AT_END.search(tail)
        self._literal = int(literal.group(1)) if literal else 0
        self._at_line_start = literal is None
        self._tail = b""
