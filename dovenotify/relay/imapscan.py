"""Sans-I/O scanners for the two directions of a relayed IMAP connection.

The relay must find a handful of client commands (XAPPLEPUSHSERVICE, COMPRESS) and
otherwise forward every byte unchanged and in order. IMAP literals (`{n}`, `{n+}`,
`~{n}`) carry arbitrary bytes, so both scanners count them out instead of looking
inside; that keeps a 50 MB APPEND or FETCH a matter of slicing, not parsing.

COMPRESS=DEFLATE (RFC 4978) would hide every later command from the relay, so the
relay terminates it: the client's side of the connection is deflated, Dovecot's
side stays plain. The client scanner answers COMPRESS itself and from then on
inflates what it is fed; the server scanner deflates what follows the answer.

Neither class touches a socket: feed bytes in, get what to do back. Forwarded data
is returned as memoryview slices of the input, so nothing large is copied.
"""

from __future__ import annotations

import re
import zlib

import attrs

# Longest command head we look at to decide whether a line is ours. Tags and
# command names are short; anything longer is somebody else's business.
HEAD_LIMIT = 256
# Longest intercepted command kept in memory. iOS sends about 250 bytes.
COMMAND_LIMIT = 16 * 1024
# Enough of a line's end to recognise a literal marker such as `~{12345678901}\r\n`.
TAIL = 32

# Output of one inflate step: a small compressed input can inflate a thousandfold.
INFLATE_STEP = 256 * 1024
# Level 1 gets most of the saving on mail text for a fraction of level 6's CPU,
# and one relay process compresses for every session.
DEFLATE_LEVEL = 1
RAW_DEFLATE = -15  # RFC 4978: raw deflate, no zlib header

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


@attrs.frozen
class Compress:
    """A COMPRESS command, answered here: send `answer` to the client in its turn, then,
    when `started`, deflate everything after it (the client's side is inflated already).
    """

    tag: bytes
    answer: bytes
    started: bool


@attrs.frozen
class Broken:
    """The client's stream cannot be read any further; the session must end."""

    reason: str


Action = Forward | Intercepted | Compress | Broken


class ClientScanner:
    """Scans the client→server stream for the commands named in `intercept`.

    COMPRESS is always taken out of the stream and answered (see `Compress`).
    """

    def __init__(self, intercept: frozenset[str] = frozenset({"XAPPLEPUSHSERVICE"})) -> None:
        self._intercept = frozenset(name.upper() for name in intercept) | {"COMPRESS"}
        self._head = bytearray()  # start of a line whose fate is undecided
        self._in_line = False  # forwarding the rest of a line that is not ours
        self._tail = b""  # end of that line so far, to spot a literal marker
        self._literal = 0  # literal bytes still to pass (or skip, when capturing)
        self._captured: bytearray | None = None  # an intercepted command being read
        self._tag = b""
        self._command = ""
        self._problem: str | None = None
        self._inflater: zlib._Decompress | None = None
        self._compression_starts = False  # the COMPRESS line just read was accepted
        self._broken = False

    @property
    def opaque(self) -> int:
        """Bytes that may bypass `feed` (e.g. be spliced): the rest of a forwarded literal."""
        if self._captured is not None or self._inflater is not None:
            return 0
        return self._literal

    def bypassed(self, count: int) -> None:
        """`count` bytes of `opaque` went on without `feed`."""
        assert 0 < count <= self.opaque
        self._literal -= count

    def feed(self, data: bytes) -> list[Action]:
        actions: list[Action] = []
        if self._broken:
            return actions
        if self._inflater is not None:
            self._inflate(data, actions)
            return actions
        stop = self._run(data, actions)
        if self._compression_starts:
            # Everything after the COMPRESS line is deflated.
            self._compression_starts = False
            self._inflater = zlib.decompressobj(RAW_DEFLATE)
            self._inflate(data[stop:], actions)
        return actions

    def _inflate(self, data: bytes, actions: list[Action]) -> None:
        assert self._inflater is not None
        try:
            while data and not self._inflater.eof:
                plain = self._inflater.decompress(data, INFLATE_STEP)
                data = self._inflater.unconsumed_tail
                self._run(plain, actions)
        except zlib.error as e:
            self._broken = True
            actions.append(Broken(f"the client's compressed data is corrupt ({e})"))

    def _run(self, data: bytes, actions: list[Action]) -> int:
        """Scan `data`; return where it stopped: its end, or the end of an accepted COMPRESS."""
        view = memoryview(data)
        pos, size = 0, len(data)
        while pos < size and not self._compression_starts:
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
        self._captured = None
        if self._command == "COMPRESS":
            actions.append(self._compress(line))
        else:
            actions.append(Intercepted(self._tag, self._command, line, self._problem))

    def _compress(self, line: bytes) -> Compress:
        """Answer as Dovecot's own COMPRESS does, and start inflating when accepted."""
        args = line.split(b" ")[2:]
        if self._problem or len(args) != 1 or not args[0]:
            answer = b"BAD Invalid arguments."
        elif self._inflater is not None:
            answer = b"NO [COMPRESSIONACTIVE] Compression already enabled."
        elif args[0].upper() != b"DEFLATE":
            answer = b"NO Unknown compression mechanism."
        else:
            self._compression_starts = True
            return Compress(self._tag, self._tag + b" OK Begin compression.\r\n", True)
        return Compress(self._tag, self._tag + b" " + answer + b"\r\n", False)


class ServerScanner:
    """Scans the server→client stream so that chosen tagged replies can be swapped.

    The relay sends a placeholder command under a tag of its own and asks, with
    `replace`, that the server's tagged reply to it be swapped for its own answer.
    That keeps pipelined replies in command order without holding anything back.
    After an answer that starts compression, everything the scanner returns is
    deflated (flushed at the end of each `feed`, so nothing waits in zlib).
    """

    def __init__(self) -> None:
        self._pending: dict[bytes, tuple[bytes, bool]] = {}
        self._deflater: zlib._Compress | None = None
        self._literal = 0
        self._at_line_start = True
        self._line: bytearray | None = None  # a line held back to check its tag
        self._tail = b""

    def replace(self, tag: bytes, answer: bytes, *, then_deflate: bool = False) -> None:
        self._pending[tag + b" "] = (answer, then_deflate)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def opaque(self) -> int:
        """Bytes that may bypass `feed` (e.g. be spliced): the rest of a literal."""
        return 0 if self._deflater is not None else self._literal

    def bypassed(self, count: int) -> None:
        """`count` bytes of `opaque` went on without `feed`."""
        assert 0 < count <= self.opaque
        self._literal -= count

    def feed(self, data: bytes) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        plain_from = 0 if self._deflater is not None else None
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
                    if self._deflater is not None and plain_from is None:
                        plain_from = len(out)
            else:
                out.append(view[pos:stop])
                self._tail = (self._tail + data[max(pos, stop - TAIL) : stop])[-TAIL:]
                if end >= 0:
                    self._line_ended(self._tail)
            pos = stop
        if plain_from is None:
            return out
        deflate = self._deflater
        assert deflate is not None
        compressed = b"".join(deflate.compress(piece) for piece in out[plain_from:])
        return [*out[:plain_from], compressed + deflate.flush(zlib.Z_SYNC_FLUSH)]

    def _swap(self, line: bytes) -> bytes:
        for prefix, (answer, then_deflate) in self._pending.items():
            if line.startswith(prefix):
                del self._pending[prefix]
                if then_deflate and self._deflater is None:
                    self._deflater = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, RAW_DEFLATE)
                return answer
        return line

    def _line_ended(self, tail: bytes) -> None:
        literal = LITERAL_AT_END.search(tail)
        self._literal = int(literal.group(1)) if literal else 0
        self._at_line_start = literal is None
        self._tail = b""
