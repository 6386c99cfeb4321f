"""The relay's stream scanners: exact forwarding, interception, literals, any chunking."""

import itertools
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

from dovenotify.relay.imapscan import (
    COMMAND_LIMIT,
    Action,
    Broken,
    ClientScanner,
    Compress,
    Forward,
    Intercepted,
    ServerScanner,
)

INTERCEPT = frozenset({"XAPPLEPUSHSERVICE"})


def run_client(
    data: bytes, cuts: list[int], scanner: ClientScanner | None = None
) -> tuple[bytes, list[Action]]:
    """What `scanner` forwards and what else it reports, fed `data` cut at `cuts`."""
    scanner = scanner or ClientScanner(INTERCEPT)
    forwarded = bytearray()
    intercepted: list[Action] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        for action in scanner.feed(data[start:cut]):
            if isinstance(action, Forward):
                forwarded += action.data
            else:
                intercepted.append(action)
        start = max(start, cut)
    return bytes(forwarded), intercepted


def test_plain_commands_pass_byte_for_byte():
    data = b"a1 NOOP\r\na2 SELECT INBOX\r\na3 IDLE\r\nDONE\r\n"
    assert run_client(data, []) == (data, [])


def test_xapplepushservice_is_taken_out_of_the_stream():
    data = b'a1 NOOP\r\nA2 XAPPLEPUSHSERVICE "aps-version" "2"\r\na3 NOOP\r\n'
    forwarded, intercepted = run_client(data, [])
    assert forwarded == b"a1 NOOP\r\na3 NOOP\r\n"
    assert intercepted == [
        Intercepted(b"A2", "XAPPLEPUSHSERVICE", b'A2 XAPPLEPUSHSERVICE "aps-version" "2"')
    ]


def test_command_name_is_case_insensitive_and_compress_is_caught():
    _, intercepted = run_client(b"x xapplepushservice\r\ny compress DEFLATE\r\n", [])
    assert intercepted == [
        Intercepted(b"x", "XAPPLEPUSHSERVICE", b"x xapplepushservice"),
        Compress(b"y", b"y OK Begin compression.\r\n", started=True),
    ]


def test_literal_content_is_never_parsed_as_a_command():
    body = b"Z1 XAPPLEPUSHSERVICE\r\nZ2 COMPRESS DEFLATE\r\n"
    for marker in (b"{%d}" % len(body), b"{%d+}" % len(body), b"~{%d}" % len(body)):
        data = b"a APPEND INBOX " + marker + b"\r\n" + body + b"\r\nb NOOP\r\n"
        assert run_client(data, [1, 17, 30]) == (data, [])


def test_line_with_two_literals():
    data = b"a LOGIN {3}\r\nbob {5+}\r\nsecre\r\nb XAPPLEPUSHSERVICE x\r\n"
    forwarded, intercepted = run_client(data, [5])
    assert forwarded == data[: data.index(b"b XAPPLE")]
    assert [i.tag for i in intercepted] == [b"b"]


def test_huge_intercepted_line_is_reported_and_stream_goes_on():
    data = b"t1 XAPPLEPUSHSERVICE " + b"x" * (10 * 1024 * 1024) + b"\r\nt2 NOOP\r\n"
    forwarded, intercepted = run_client(data, list(range(0, len(data), 65536)))
    assert forwarded == b"t2 NOOP\r\n"
    assert len(intercepted) == 1
    assert intercepted[0].problem == "the command line is too long"
    assert len(intercepted[0].line) <= COMMAND_LIMIT + 64


def test_literal_inside_intercepted_command():
    sync = b"t XAPPLEPUSHSERVICE {3}\r\n"
    _, (cmd,) = run_client(sync, [])
    assert cmd.problem == "literals are not supported in this command"
    nonsync = b"t XAPPLEPUSHSERVICE {3+}\r\nabc more\r\nu NOOP\r\n"
    forwarded, (cmd,) = run_client(nonsync, [])
    assert cmd.problem and forwarded == b"u NOOP\r\n"


chunks = st.lists(st.integers(min_value=0, max_value=400), max_size=20)
imap_pieces = st.lists(
    st.one_of(
        st.sampled_from(
            [
                b"a NOOP\r\n",
                b"b XAPPLEPUSHSERVICE aps-version 2\r\n",
                b"c APPEND INBOX {4}\r\n",
                b"d APPEND INBOX {6+}\r\n",
                b"e FETCH 1 BODY[] ~{3}\r\n",
                b"DONE\r\n",
                b"\r\n",
                b"{",
                b"}",
                b"\n",
            ]
        ),
        st.binary(max_size=40),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(pieces=imap_pieces, cuts=chunks)
def test_any_chunking_gives_the_same_result_and_never_raises(pieces, cuts):
    data = b"".join(pieces)
    whole = run_client(data, [])
    assert run_client(data, cuts) == whole
    forwarded, intercepted = whole
    # Nothing is invented: what comes out is at most what went in.
    assert len(forwarded) + sum(len(i.line) for i in intercepted) <= len(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=chunks)
def test_without_interceptions_everything_is_forwarded(data, cuts):
    # A command line always ends in a newline before a client waits for an answer;
    # only the bytes of an unfinished line may be held back.
    data = data.upper().replace(b"XAPPLE", b"XAPPL_").replace(b"COMPRESS", b"COMPRES_")
    forwarded, intercepted = run_client(data, cuts)
    assert intercepted == []
    assert data.startswith(forwarded)
    assert b"\n" not in data[len(forwarded) :]
    assert run_client(data + b"\r\n", cuts) == (data + b"\r\n", [])


def run_server(scanner: ServerScanner, data: bytes, cuts: list[int]) -> bytes:
    out = bytearray()
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        for chunk in scanner.feed(data[start:cut]):
            out += chunk
        start = max(start, cut)
    return bytes(out)


def test_server_reply_to_placeholder_is_swapped():
    scanner = ServerScanner()
    scanner.replace(b"dovenotify.1", b"A2 OK XAPPLEPUSHSERVICE completed.\r\n")
    data = b"a1 OK NOOP done\r\n* 3 EXISTS\r\ndovenotify.1 OK NOOP completed.\r\na3 OK\r\n"
    assert run_server(scanner, data, [3, 20, 40]) == (
        b"a1 OK NOOP done\r\n* 3 EXISTS\r\nA2 OK XAPPLEPUSHSERVICE completed.\r\na3 OK\r\n"
    )
    assert scanner.pending == 0


def test_server_literal_that_looks_like_the_reply_is_not_swapped():
    scanner = ServerScanner()
    scanner.replace(b"dovenotify.1", b"X\r\n")
    body = b"dovenotify.1 OK fake\r\n"
    data = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\ndovenotify.1 OK\r\n"
    assert run_server(scanner, data, [5, 30]) == data.replace(b"dovenotify.1 OK\r\n", b"X\r\n")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=chunks)
def test_server_stream_without_placeholders_is_untouched(data, cuts):
    assert run_server(ServerScanner(), data, cuts) == data


# --- COMPRESS=DEFLATE, terminated by the relay -----------------------------------


def deflate(data: bytes) -> bytes:
    """`data` as a compressing client sends it: raw deflate, flushed."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)


AFTER_COMPRESS = (
    b"d NOOP\r\ne APPEND INBOX {26}\r\nf XAPPLEPUSHSERVICE inside\r\n\r\n"
    b"g XAPPLEPUSHSERVICE aps-version 2\r\nh COMPRESS DEFLATE\r\n"
)


@settings(max_examples=200, deadline=None)
@given(cuts=chunks)
def test_after_compress_the_client_stream_is_inflated_then_scanned(cuts):
    data = b"a NOOP\r\nc COMPRESS DEFLATE\r\n" + deflate(AFTER_COMPRESS)
    forwarded, others = run_client(data, cuts)
    assert (
        forwarded
        == b"a NOOP\r\nd NOOP\r\ne APPEND INBOX {26}\r\nf XAPPLEPUSHSERVICE inside\r\n\r\n"
    )
    assert others == [
        Compress(b"c", b"c OK Begin compression.\r\n", started=True),
        Intercepted(b"g", "XAPPLEPUSHSERVICE", b"g XAPPLEPUSHSERVICE aps-version 2"),
        Compress(b"h", b"h NO [COMPRESSIONACTIVE] Compression already enabled.\r\n", False),
    ]


@settings(max_examples=200, deadline=None)
@given(pieces=imap_pieces, cuts=chunks)
def test_a_compressed_stream_scans_as_its_plain_text_would(pieces, cuts):
    plain = b"".join(pieces)
    data = b"c COMPRESS DEFLATE\r\n" + deflate(plain)
    forwarded, (compress, *others) = run_client(data, cuts)
    assert compress == Compress(b"c", b"c OK Begin compression.\r\n", started=True)
    assert (forwarded, others) == run_client(plain, [])


def test_compress_refusals_leave_the_stream_plain():
    data = b"a COMPRESS GZIP\r\nb COMPRESS\r\nc COMPRESS DEFLATE x\r\nd NOOP\r\n"
    forwarded, others = run_client(data, [])
    assert forwarded == b"d NOOP\r\n"
    assert others == [
        Compress(b"a", b"a NO Unknown compression mechanism.\r\n", started=False),
        Compress(b"b", b"b BAD Invalid arguments.\r\n", started=False),
        Compress(b"c", b"c BAD Invalid arguments.\r\n", started=False),
    ]


def test_a_decompression_bomb_is_inflated_in_steps():
    bomb = b"a APPEND INBOX {%d}\r\n" % (50 * 1024 * 1024) + b"\0" * (50 * 1024 * 1024)
    scanner = ClientScanner(INTERCEPT)
    scanner.feed(b"c COMPRESS DEFLATE\r\n")
    actions = scanner.feed(deflate(bomb))
    assert max(len(a.data) for a in actions if isinstance(a, Forward)) <= 256 * 1024
    assert sum(len(a.data) for a in actions if isinstance(a, Forward)) == len(bomb)


@settings(max_examples=100, deadline=None)
@given(garbage=st.binary(max_size=200), cuts=chunks)
def test_corrupt_compressed_data_breaks_the_session_without_raising(garbage, cuts):
    _, others = run_client(b"c COMPRESS DEFLATE\r\n" + b"\xff\xff" + garbage, cuts)
    assert isinstance(others[-1], Broken)


def test_server_stream_is_deflated_after_the_compress_answer():
    scanner = ServerScanner()
    scanner.replace(b"dovenotify.1", b"c OK Begin compression.\r\n", then_deflate=True)
    before = b"a OK NOOP\r\n* 2 EXISTS\r\n"
    after = b"* 1 FETCH (BODY[] {5}\r\nhello)\r\nd OK done\r\n"
    out = run_server(scanner, before + b"dovenotify.1 OK NOOP\r\n" + after[:20], [4])
    out += run_server(scanner, after[20:], [])
    plain = before + b"c OK Begin compression.\r\n"
    assert out.startswith(plain)
    assert zlib.decompressobj(-15).decompress(out[len(plain) :]) == after


@settings(max_examples=200, deadline=None)
@given(pieces=imap_pieces, cuts=chunks, bypass=st.integers(min_value=1, max_value=50))
def test_bypassing_literal_bytes_is_the_same_as_feeding_them(pieces, cuts, bypass):
    """What the relay splices past the scanners leaves them where feeding would."""
    data = b"".join(pieces)
    for make in (lambda: ClientScanner(INTERCEPT), ServerScanner):
        fed, spliced = make(), make()
        expected = bytearray()
        got = bytearray()
        for chunk in cut(data, cuts):
            expected += b"".join(_forwarded(fed.feed(chunk)))
            while chunk:
                if spliced.opaque:
                    n = min(spliced.opaque, bypass, len(chunk))
                    spliced.bypassed(n)
                    got += chunk[:n]
                    chunk = chunk[n:]
                else:
                    # Fed one byte at a time, so that a literal's start is seen.
                    got += b"".join(_forwarded(spliced.feed(chunk[:1])))
                    chunk = chunk[1:]
        assert got == expected


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _forwarded(actions: list) -> list[bytes]:
    return [
        bytes(a.data) if isinstance(a, Forward) else bytes(a)
        for a in actions
        if isinstance(a, Forward | bytes | memoryview)
    ]
