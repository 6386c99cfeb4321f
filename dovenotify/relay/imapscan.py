"""Sans-I/O scanners for the two directions of a relayed IMAP connection.

The relay only needs the start of a session: iOS registers right after login. So
the client scanner looks for XAPPLEPUSHSERVICE among a session's first commands and
then steps out (see `ClientScanner`); from there on both directions are an endless
opaque stretch that the relay moves without looking at it. The server scanner
swaps the relay's answers in, adds the XAPPLEPUSHSERVICE capability while the relay
will still answer it, and tells the client scanner how Dovecot answered a command
whose continuation depends on it (a synchronizing literal, COMPRESS).

IMAP literals (`{n}`, `{n+}`, `~{n}`) carry arbitrary bytes, so both scanners count
them out instead of looking inside; that keeps a 50 MB APPEND or FETCH a matter of
slicing, not parsing. Neither class touches a socket: feed bytes in, get what to do
back. Forwarded data is returned as memoryview slices of the input, so nothing
large is copied.

Over 400 lines: the two scanners share the literal grammar and hand each other
verdicts (a literal's go-ahead, COMPRESS); apart, each would import the other's.
"""

from __future__ import annotations

import re
import sys

import attrs

# Longest command head we look at to decide whether a line is ours. Tags and
# command names are short; anything longer is somebody else's business.
HEAD_LIMIT = 256
# Longest intercepted command kept in memory. iOS sends about 250 bytes.
COMMAND_LIMIT = 16 * 1024
# Enough of a line's end to recognise a literal marker such as `~{12345678901}\r\n`.
TAIL = 32
# iOS registers among the first few commands after login. A session that has sent
# this many without registering is not going to: the relay steps out of it.
SCAN_COMMANDS = 32
# After stepping out, everything is opaque: more than any session will carry.
ENDLESS = sys.maxsize
# Server lines are held only while it is unclear whether the relay changes them:
# the first SERVER_HEAD bytes decide, and a line held whole is at most SERVER_LINE.
SERVER_HEAD = 64
SERVER_LINE = 64 * 1024

LITERAL_AT_END = re.compile(rb"~?\{(\d{1,20})(\+?)\}\r?\n\Z")
HEAD = re.compile(rb"([^ \r\n]+) ([A-Za-z]+)[ \r\n]")
# Commands after which the relay steps out at once: nothing it needs comes later.
STEP_OUT_AT = frozenset({"IDLE"})


@attrs.frozen
class Forward:
    """Bytes to pass on unchanged."""

    data: bytes | memoryview


@attrs.frozen
class Intercepted:
    """A whole client command that the relay answers itself.

    `line` is the command without its CRLF (and without any literal); `problem` is
    set when it could not be taken whole: too long, or it carried a literal. The
    scanner holds what follows until `resume`.
    """

    tag: bytes
    command: str
    line: bytes
    problem: str | None = None


@attrs.frozen
class AwaitVerdict:
    """The command `tag`, forwarded, goes on only as Dovecot decides: a synchronizing
    literal comes only after a "+", compressed data only after COMPRESS's OK. The
    scanner holds what follows until `verdict`; `ServerScanner.expect` finds it."""

    tag: bytes
    compress: bool


Action = Forward | Intercepted | AwaitVerdict


class ClientScanner:
    """Scans the client→server stream for the commands named in `intercept`.

    It steps out (everything after is opaque, see `stepped_out`) after a successful
    registration (`resume(step_out=True)`), after IDLE, after COMPRESS that Dovecot
    accepted (from there the stream is Dovecot's own compression), and at the start
    of command number SCAN_COMMANDS + 1.
    """

    def __init__(self, intercept: frozenset[str] = frozenset({"XAPPLEPUSHSERVICE"})) -> None:
        self._intercept = frozenset(name.upper() for name in intercept)
        self._head = bytearray()  # start of a line whose fate is undecided
        self._in_line = False  # forwarding the rest of a line that is not ours
        self._tail = b""  # end of that line so far, to spot a literal marker
        self._literal = 0  # literal bytes still to pass (or skip, when capturing)
        self._captured: bytearray | None = None  # an intercepted command being read
        self._tag = b""  # of the command being read
        self._command = ""
        self._problem: str | None = None
        self._commands = 0  # commands seen so far
        self._held = b""  # what came after a point where the scanner waits
        self._waiting: AwaitVerdict | Intercepted | None = None
        self._verdict_literal = 0  # the synchronizing literal awaiting its verdict
        self.stepped_out = False

    @property
    def opaque(self) -> int:
        """Bytes that may bypass `feed` (e.g. be spliced): the rest of a forwarded
        literal, or everything once stepped out."""
        if self.stepped_out:
            return ENDLESS
        if self._captured is not None or self._waiting is not None:
            return 0
        return self._literal

    def bypassed(self, count: int) -> None:
        """`count` bytes of `opaque` went on without `feed`."""
        assert 0 < count <= self.opaque
        if not self.stepped_out:
            self._literal -= count

    def feed(self, data: bytes) -> list[Action]:
        if self.stepped_out:
            return [Forward(data)] if data else []
        if self._waiting is not None:
            self._held += data
            return []
        actions: list[Action] = []
        stop = self._run(data, actions)
        if stop < len(data):
            self._held = data[stop:]
        return actions

    def resume(self, *, step_out: bool = False) -> list[Action]:
        """The intercepted command was answered: go on with what followed it."""
        assert isinstance(self._waiting, Intercepted)
        self.stepped_out = step_out
        return self._go_on()

    def verdict(self, accepted: bool) -> list[Action]:
        """Dovecot's answer to the command of `AwaitVerdict`: a "+" or an OK (True),
        or a tagged refusal (False). Go on with what followed."""
        waiting = self._waiting
        assert isinstance(waiting, AwaitVerdict)
        if waiting.compress:
            self.stepped_out = accepted
        elif accepted:
            self._literal = self._verdict_literal
        else:
            # Refused: the command is over, and no literal comes.
            self._in_line = False
        self._verdict_literal = 0
        return self._go_on()

    def _go_on(self) -> list[Action]:
        self._waiting = None
        held, self._held = self._held, b""
        return self.feed(held)

    def _run(self, data: bytes, actions: list[Action]) -> int:
        """Scan `data`; return where it stopped: its end, or where the scanner waits."""
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size and self._waiting is None and not self.stepped_out:
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
            elif not self._head and self._commands >= SCAN_COMMANDS:
                self.stepped_out = True
            else:
                pos = self._decide(data, pos, actions)
        if self.stepped_out and pos < size:
            actions.append(Forward(view[pos:]))
            return size
        return pos

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
        self._commands += 1
        self._tag = match.group(1) if match else head.split(b" ", 1)[0]
        self._command = match.group(2).upper().decode() if match else ""
        if self._command in self._intercept:
            self._captured = bytearray()
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
        if end < 0:
            return stop
        literal = LITERAL_AT_END.search(self._tail)
        self._tail = b""
        if literal is not None:
            # The command goes on after its literal.
            size = int(literal.group(1))
            if literal.group(2):
                self._literal = size
            else:
                # The client sends it only after Dovecot's "+"; Dovecot may refuse.
                self._verdict_literal = size
                self._wait(AwaitVerdict(self._tag, compress=False), actions)
        else:
            self._in_line = False
            if self._command == "COMPRESS":
                self._wait(AwaitVerdict(self._tag, compress=True), actions)
            elif self._command in STEP_OUT_AT:
                self.stepped_out = True
        return stop

    def _wait(self, waiting: AwaitVerdict | Intercepted, actions: list[Action]) -> None:
        self._waiting = waiting
        actions.append(waiting)

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
        self._captured = None
        self._wait(Intercepted(self._tag, self._command, line, self._problem), actions)


CAPABILITY_UNTAGGED = re.compile(rb"\* CAPABILITY ([^\r\n]*)", re.IGNORECASE)
CAPABILITY_CODE = re.compile(rb"[^ \r\n]+ OK \[CAPABILITY ([^\]\r\n]*)\]", re.IGNORECASE)


class ServerScanner:
    """Scans the server→client stream until the relay steps out of the session.

    - `replace`: the relay sends a placeholder command under a tag of its own and
      asks that the server's tagged reply to it be swapped for its own answer. That
      keeps pipelined replies in command order without holding anything back.
    - `advertise`: a capability added to every `* CAPABILITY` line and to a tagged
      `OK [CAPABILITY ...]` (the login's) that the scanner sees.
    - `expect`: report (`verdict`) how the server answered an `AwaitVerdict`.
    - `leave`: step out once no replacement or verdict is outstanding.
    """

    def __init__(self, advertise: bytes | None = None) -> None:
        self._advertise = advertise
        self._pending: dict[bytes, bytes] = {}
        self._expected: AwaitVerdict | None = None
        self.verdict: bool | None = None  # the last verdict found, until taken
        self._leaving = False
        self.stepped_out = False
        self._literal = 0
        self._at_line_start = True
        self._line: bytearray | None = None  # a line (or its head) held back
        self._whole = False  # the held line must be held to its end
        self._tail = b""

    def replace(self, tag: bytes, answer: bytes) -> None:
        self._pending[tag + b" "] = answer

    @property
    def pending(self) -> int:
        return len(self._pending)

    def expect(self, waiting: AwaitVerdict) -> None:
        self._expected = waiting

    def take_verdict(self) -> bool | None:
        verdict, self.verdict = self.verdict, None
        return verdict

    def leave(self) -> None:
        self._leaving = True
        if self._line is None:
            self._maybe_step_out()

    @property
    def opaque(self) -> int:
        """Bytes that may bypass `feed` (e.g. be spliced): the rest of a literal, or
        everything once stepped out."""
        return ENDLESS if self.stepped_out else self._literal

    def bypassed(self, count: int) -> None:
        """`count` bytes of `opaque` went on without `feed`."""
        assert 0 < count <= self.opaque
        if not self.stepped_out:
            self._literal -= count

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size:
            if self._leaving and self._line is None:
                self._maybe_step_out()
            if self.stepped_out:
                out.append(view[pos:])
                break
            if self._literal:
                n = min(self._literal, size - pos)
                self._literal -= n
                out.append(view[pos : pos + n])
                pos += n
                continue
            end = data.find(b"\n", pos)
            stop = size if end < 0 else end + 1
            if self._at_line_start:
                self._at_line_start = False
                self._line, self._whole = bytearray(), False
            if self._line is not None:
                pos = self._hold(data, pos, stop, end >= 0, out)
                continue
            out.append(view[pos:stop])
            self._tail = (self._tail + data[max(pos, stop - TAIL) : stop])[-TAIL:]
            if end >= 0:
                self._line_ended(self._tail)
            pos = stop
        return out

    def _hold(
        self, data: bytes, pos: int, stop: int, ended: bool, out: list[bytes | memoryview]
    ) -> int:
        assert self._line is not None
        limit = SERVER_LINE if self._whole else SERVER_HEAD
        take = min(stop, pos + limit - len(self._line))
        self._line += data[pos:take]
        if take == stop and ended:
            line, self._line = bytes(self._line), None
            out.append(self._change(line))
            self._line_ended(line[-TAIL:])
        elif self._whole and len(self._line) < limit:
            pass
        elif not self._whole and self._may_matter(self._line):
            # Every line the scanner changes has a short head: a long one is decided.
            self._whole = len(self._line) >= limit
        else:
            # Not ours, or too long to be: let it through as it is.
            out.append(bytes(self._line))
            self._tail, self._line = bytes(self._line[-TAIL:]), None
        return take

    def _may_matter(self, head: bytearray) -> bool:
        """Whether a line starting with `head` may be one the scanner changes or reads."""
        if any(_compatible(head, prefix) for prefix in self._pending):
            return True
        expected = self._expected
        if expected is not None and (
            (head[:1] == b"+" and not expected.compress) or _compatible(head, expected.tag + b" ")
        ):
            return True
        if self._advertise is None:
            return False
        upper = head.upper()
        if _compatible(upper, b"* CAPABILITY "):
            return True
        tag, space, rest = upper.partition(b" ")
        return (not space and len(tag) < SERVER_HEAD) or _compatible(rest, b"OK [CAPABILITY ")

    def _change(self, line: bytes) -> bytes:
        for prefix, answer in self._pending.items():
            if line.startswith(prefix):
                del self._pending[prefix]
                self._maybe_step_out()
                return answer
        expected = self._expected
        if expected is not None:
            if line.startswith(b"+") and not expected.compress:
                self._decided(True)
            elif line.startswith(expected.tag + b" "):
                accepted = line[len(expected.tag) + 1 :][:3].upper() == b"OK "
                # For a literal, a tagged answer instead of "+" is a refusal.
                self._decided(accepted and expected.compress)
                if accepted and expected.compress:
                    # What follows this line is compressed: the relay is done here.
                    self.stepped_out = True
                return line
        return self._advertised(line)

    def _decided(self, accepted: bool) -> None:
        self.verdict, self._expected = accepted, None
        self._maybe_step_out()

    def _advertised(self, line: bytes) -> bytes:
        if self._advertise is None:
            return line
        match = CAPABILITY_UNTAGGED.match(line) or CAPABILITY_CODE.match(line)
        if match is None or self._advertise.upper() in match.group(1).upper().split(b" "):
            return line
        return line[: match.end(1)] + b" " + self._advertise + line[match.end(1) :]

    def _maybe_step_out(self) -> None:
        if self._leaving and not self._pending and self._expected is None:
            self.stepped_out = True

    def _line_ended(self, tail: bytes) -> None:
        literal = LITERAL_AT_END.search(tail)
        self._literal = int(literal.group(1)) if literal else 0
        self._at_line_start = literal is None
        self._tail = b""


def _compatible(head: bytes | bytearray, prefix: bytes) -> bool:
    """Whether a line starting with `head` may start with `prefix`."""
    return head.startswith(prefix) if len(head) >= len(prefix) else prefix.startswith(head)
