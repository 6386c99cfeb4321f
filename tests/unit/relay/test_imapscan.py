"""The relay's stream scanners: exact forwarding, interception, literals, any chunking."""

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from dovenotify.relay.imapscan import (
    COMMAND_LIMIT,
    ENDLESS,
    SCAN_COMMANDS,
    Action,
    AwaitVerdict,
    ClientScanner,
    Forward,
    Intercepted,
    ServerScanner,
)

INTERCEPT = frozenset({"XAPPLEPUSHSERVICE"})


def run_client(
    data: bytes,
    cuts: list[int],
    scanner: ClientScanner | None = None,
    *,
    accept: bool = True,
    registered: bool = False,
) -> tuple[bytes, list[Action]]:
    """What `scanner` forwards and what else it reports, fed `data` cut at `cuts`.
    Dovecot's verdicts are all `accept`; each interception ends in `registered`."""
    scanner = scanner or ClientScanner(INTERCEPT)
    forwarded = bytearray()
    intercepted: list[Action] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        actions = scanner.feed(data[start:cut])
        while actions:
            action = actions.pop(0)
            if isinstance(action, Forward):
                forwarded += action.data
                continue
            intercepted.append(action)
            if isinstance(action, AwaitVerdict):
                actions += scanner.verdict(accept)
            else:
                actions += scanner.resume(step_out=registered)
        start = max(start, cut)
    return bytes(forwarded), intercepted


def commands_of(actions: list[Action]) -> list[Action]:
    return [a for a in actions if not isinstance(a, AwaitVerdict)]


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


def test_command_name_is_case_insensitive():
    _, intercepted = run_client(b"x xapplepushservice\r\n", [])
    assert intercepted == [Intercepted(b"x", "XAPPLEPUSHSERVICE", b"x xapplepushservice")]


def test_literal_content_is_never_parsed_as_a_command():
    body = b"Z1 XAPPLEPUSHSERVICE\r\nZ2 COMPRESS DEFLATE\r\n"
    for marker in (b"{%d}" % len(body), b"{%d+}" % len(body), b"~{%d}" % len(body)):
        data = b"a APPEND INBOX " + marker + b"\r\n" + body + b"\r\nb NOOP\r\n"
        forwarded, others = run_client(data, [1, 17, 30])
        assert forwarded == data
        assert commands_of(others) == []


def test_line_with_two_literals():
    data = b"a LOGIN {3}\r\nbob {5+}\r\nsecre\r\nb XAPPLEPUSHSERVICE x\r\n"
    forwarded, intercepted = run_client(data, [5])
    assert forwarded == data[: data.index(b"b XAPPLE")]
    assert [i.tag for i in intercepted] == [b"a", b"b"]
    assert isinstance(intercepted[0], AwaitVerdict)


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
    lines = sum(len(i.line) for i in intercepted if isinstance(i, Intercepted))
    assert len(forwarded) + lines <= len(data)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=chunks)
def test_without_interceptions_everything_is_forwarded(data, cuts):
    # A command line always ends in a newline before a client waits for an answer;
    # only the bytes of an unfinished line may be held back.
    data = data.upper().replace(b"XAPPLE", b"XAPPL_")
    forwarded, intercepted = run_client(data, cuts)
    assert commands_of(intercepted) == []
    assert data.startswith(forwarded)
    assert b"\n" not in data[len(forwarded) :]
    forwarded, intercepted = run_client(data + b"\r\n", cuts)
    assert forwarded == data + b"\r\n"


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


# --- waiting for Dovecot's verdict ---------------------------------------------

REGISTER = b"b XAPPLEPUSHSERVICE aps-version 2\r\n"


def test_a_refused_synchronizing_literal_is_not_counted():
    # Dovecot answers `a NO [TRYCREATE]` instead of "+": the client sends no
    # literal, and its next command is a command again.
    data = b"a APPEND NoSuchBox {20}\r\n" + REGISTER
    forwarded, others = run_client(data, [], accept=False)
    assert forwarded == b"a APPEND NoSuchBox {20}\r\n"
    assert others == [
        AwaitVerdict(b"a", compress=False),
        Intercepted(b"b", "XAPPLEPUSHSERVICE", REGISTER.rstrip()),
    ]


def test_an_accepted_synchronizing_literal_is_passed_unread():
    literal = REGISTER.ljust(40, b"x")
    data = b"a APPEND INBOX {40}\r\n" + literal + b"\r\nc NOOP\r\n"
    forwarded, others = run_client(data, [3, 25], accept=True)
    assert forwarded == data
    assert others == [AwaitVerdict(b"a", compress=False)]


def test_the_scanner_holds_what_follows_until_the_verdict():
    scanner = ClientScanner(INTERCEPT)
    actions = scanner.feed(b"a APPEND INBOX {5}\r\nhello")
    assert [bytes(a.data) for a in actions if isinstance(a, Forward)] == [b"a APPEND INBOX {5}\r\n"]
    assert actions[-1] == AwaitVerdict(b"a", compress=False)
    assert scanner.opaque == 0
    assert scanner.feed(b"\r\n") == []
    assert [bytes(a.data) for a in scanner.verdict(True)] == [b"hello", b"\r\n"]


# --- stepping out -------------------------------------------------------------


def test_after_a_registration_the_scanner_steps_out():
    after = b"c NOOP\r\n" + REGISTER + b"d IDLE\r\n"
    forwarded, others = run_client(b"a NOOP\r\n" + REGISTER + after, [12], registered=True)
    assert forwarded == b"a NOOP\r\n" + after
    assert [type(a) for a in others] == [Intercepted]


def test_a_failed_registration_keeps_the_scanner_in():
    forwarded, others = run_client(REGISTER + REGISTER, [], registered=False)
    assert forwarded == b""
    assert len(others) == 2


def test_compress_accepted_steps_out_and_its_data_passes_verbatim():
    compressed = bytes(range(256)) + REGISTER
    scanner = ClientScanner(INTERCEPT)
    data = b"a NOOP\r\nc COMPRESS DEFLATE\r\n" + compressed
    forwarded, others = run_client(data, [20], scanner, accept=True)
    assert forwarded == data
    assert others == [AwaitVerdict(b"c", compress=True)]
    assert scanner.stepped_out and scanner.opaque == ENDLESS


def test_compress_refused_keeps_scanning():
    data = b"c COMPRESS DEFLATE\r\n" + REGISTER
    forwarded, others = run_client(data, [], accept=False)
    assert forwarded == b"c COMPRESS DEFLATE\r\n"
    assert [type(a) for a in others] == [AwaitVerdict, Intercepted]


def test_idle_steps_out():
    scanner = ClientScanner(INTERCEPT)
    data = b"i IDLE\r\nDONE\r\n" + REGISTER
    assert run_client(data, [3], scanner) == (data, [])
    assert scanner.stepped_out


def test_after_scan_commands_without_registering_the_scanner_steps_out():
    noops = b"".join(b"n%d NOOP\r\n" % i for i in range(SCAN_COMMANDS))
    scanner = ClientScanner(INTERCEPT)
    assert run_client(noops + REGISTER, [7, 100], scanner) == (noops + REGISTER, [])
    assert scanner.stepped_out
    # One command fewer and the registration is still seen.
    _, others = run_client(noops[noops.index(b"n1 ") :] + REGISTER, [])
    assert [type(a) for a in others] == [Intercepted]


# --- the server side ------------------------------------------------------------

CAPS = b"IMAP4rev1 SASL-IR LITERAL+ IDLE"


def test_capability_is_added_to_both_forms_once():
    scanner = ServerScanner(b"XAPPLEPUSHSERVICE")
    data = (
        b"a1 OK [CAPABILITY " + CAPS + b"] Logged in\r\n"
        b"* CAPABILITY " + CAPS + b"\r\n"
        b"* CAPABILITY " + CAPS + b" XAPPLEPUSHSERVICE\r\n"
        b"a2 OK Capability completed.\r\n"
    )
    assert run_server(scanner, data, [5, 40, 70]) == (
        b"a1 OK [CAPABILITY " + CAPS + b" XAPPLEPUSHSERVICE] Logged in\r\n"
        b"* CAPABILITY " + CAPS + b" XAPPLEPUSHSERVICE\r\n"
        b"* CAPABILITY " + CAPS + b" XAPPLEPUSHSERVICE\r\n"
        b"a2 OK Capability completed.\r\n"
    )


def test_capability_is_not_added_inside_literals_or_other_lines():
    body = b"* CAPABILITY IMAP4rev1\r\n"
    data = (
        b"* 1 FETCH (BODY[] {%d}\r\n" % len(body) + body + b")\r\n"
        b"* OK [CAPABILITY x] later\r\n"
        b"* 2 EXISTS " + b"x" * 200_000 + b"\r\n"
    )
    out = run_server(ServerScanner(b"XAPPLEPUSHSERVICE"), data, [3, 90, 100])
    assert out == data.replace(b"[CAPABILITY x]", b"[CAPABILITY x XAPPLEPUSHSERVICE]")


def test_verdicts_on_a_literal():
    for answer, verdict in ((b"+ OK\r\n", True), (b"a NO [TRYCREATE] No such box\r\n", False)):
        scanner = ServerScanner()
        scanner.expect(AwaitVerdict(b"a", compress=False))
        data = b"* 3 EXISTS\r\nb OK done\r\n" + answer
        assert run_server(scanner, data, [4]) == data
        assert scanner.take_verdict() is verdict
        assert scanner.take_verdict() is None


def test_compress_ok_steps_the_server_scanner_out_before_compressed_data():
    scanner = ServerScanner(b"XAPPLEPUSHSERVICE")
    scanner.expect(AwaitVerdict(b"c", compress=True))
    data = b"c OK Begin compression.\r\n\x00\x00\xff\xff* CAPABILITY x\r\n"
    assert run_server(scanner, data, [30]) == data
    assert scanner.take_verdict() is True
    assert scanner.stepped_out and scanner.opaque == ENDLESS


def test_leaving_waits_for_pending_replies():
    scanner = ServerScanner(b"XAPPLEPUSHSERVICE")
    scanner.replace(b"dovenotify.1", b"b OK XAPPLEPUSHSERVICE completed.\r\n")
    scanner.leave()
    assert not scanner.stepped_out
    data = b"* CAPABILITY x\r\ndovenotify.1 OK NOOP\r\n* CAPABILITY y\r\n"
    assert run_server(scanner, data, [6]) == (
        b"* CAPABILITY x XAPPLEPUSHSERVICE\r\nb OK XAPPLEPUSHSERVICE completed.\r\n"
        b"* CAPABILITY y\r\n"
    )
    assert scanner.stepped_out


def test_leaving_never_drops_a_held_line():
    scanner = ServerScanner(b"XAPPLEPUSHSERVICE")
    out = run_server(scanner, b"* CAPAB", [])
    scanner.leave()
    out += run_server(scanner, b"ILITY x\r\n* more\r\n", [])
    assert out == b"* CAPABILITY x XAPPLEPUSHSERVICE\r\n* more\r\n"
    assert scanner.stepped_out


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=600), cuts=chunks)
def test_server_stream_gains_only_the_capability(data, cuts):
    # Ending in a line end: a line that may get the capability waits for its end.
    data = data.replace(b"XAPPLEPUSHSERVICE", b"") + b"\r\n"
    out = run_server(ServerScanner(b"XAPPLEPUSHSERVICE"), data, cuts)
    assert out.replace(b" XAPPLEPUSHSERVICE", b"") == data
    assert run_server(ServerScanner(b"XAPPLEPUSHSERVICE"), data, []) == out


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
            expected += b"".join(_forwarded(resolved(fed, fed.feed(chunk))))
            while chunk:
                if spliced.opaque:
                    n = min(spliced.opaque, bypass, len(chunk))
                    spliced.bypassed(n)
                    got += chunk[:n]
                    chunk = chunk[n:]
                else:
                    # Fed one byte at a time, so that a literal's start is seen.
                    got += b"".join(_forwarded(resolved(spliced, spliced.feed(chunk[:1]))))
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


def resolved(scanner: ClientScanner | ServerScanner, actions: list) -> list:
    """`actions`, with every wait of a client scanner resolved as accepted."""
    out = []
    while actions:
        action = actions.pop(0)
        out.append(action)
        if isinstance(action, AwaitVerdict):
            actions += scanner.verdict(True)
        elif isinstance(action, Intercepted):
            actions += scanner.resume()
    return out
