"""Malformed input everywhere: every sans-I/O parser, fed anything, answers or refuses cleanly.

Bounded (a few hundred cases each, well under a second per parser) so that it runs
in CI on every change. "Cleanly" means: no exception other than the parser's own
documented error, and no hang (hypothesis's deadline catches a parser that loops).
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dovenotify import apns, config, events, imapscan, xaps
from dovenotify.certificates import CertificateError, load_credentials

FUZZ = settings(max_examples=300, deadline=500, suppress_health_check=[HealthCheck.too_slow])

# Bytes that look a bit like what each parser expects, mixed with anything at all.
IMAP_PIECES = st.sampled_from(
    [
        b"A1 ",
        b"XAPPLEPUSHSERVICE ",
        b"COMPRESS DEFLATE",
        b"\r\n",
        b"{5}\r\n",
        b"{3+}\r\n",
        b"~{2}\r\n",
        b'"aps-version" "2" ',
        b'"mailboxes" ("INBOX" "Notes")',
        b"(",
        b")",
        b'"',
        b"\\",
        b"* OK ",
        b"dovenotify.1 OK done\r\n",
        b"\x00",
        b"\xff",
    ]
)
noisy_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(IMAP_PIECES, st.binary(max_size=8)), max_size=40).map(b"".join),
)
chunkings = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20)


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out.append(data[pos : pos + size])
        pos += size
        i += 1
    return out


EVENT_PIECES = st.sampled_from(
    [b"MessageNew", b"\t", b"alice", b"INBOX", b"lmtp", b"\n", b"\r", b"%0A", b"%", b"\xc3"]
)


@FUZZ
@given(
    st.lists(st.one_of(EVENT_PIECES, st.binary(max_size=10)), max_size=60).map(b"".join), chunkings
)
def test_events_decoder(data, sizes):
    decoder = events.EventDecoder()
    out = [item for chunk in chunks(data, sizes) for item in decoder.feed(chunk)]
    out += decoder.close()
    assert all(isinstance(item, events.Event | events.BadLine) for item in out)
    # However the bytes were split, the decoder finds the same events.
    whole = events.EventDecoder()
    assert [i for i in out if isinstance(i, events.Event)] == [
        i for i in [*whole.feed(data), *whole.close()] if isinstance(i, events.Event)
    ]


@FUZZ
@given(noisy_bytes)
def test_xaps_parser(line):
    try:
        request = xaps.parse(line)
    except xaps.XapsError as e:
        assert str(e)  # the iPhone gets a BAD with a reason
    else:
        assert request.account_id and request.device_token and request.mailboxes


@FUZZ
@given(noisy_bytes, chunkings)
def test_client_scanner(data, sizes):
    scanner = imapscan.ClientScanner()
    for chunk in chunks(data, sizes):
        for action in scanner.feed(chunk):
            assert isinstance(
                action,
                imapscan.Forward | imapscan.Intercepted | imapscan.Compress | imapscan.Broken,
            )


@FUZZ
@given(noisy_bytes, chunkings)
def test_server_scanner_forwards_everything_it_does_not_swap(data, sizes):
    scanner = imapscan.ServerScanner()
    forwarded = b"".join(bytes(piece) for c in chunks(data, sizes) for piece in scanner.feed(c))
    # With nothing to swap, nothing is held back or changed.
    assert forwarded == data


@FUZZ
@given(
    st.integers(min_value=0, max_value=999),
    noisy_bytes
    | st.from_regex(
        r'\{"reason": ?"[A-Za-z]{0,20}"(, ?"timestamp": ?-?[0-9.e]{1,20})?\}', fullmatch=True
    ).map(str.encode),
)
def test_apns_classifier(status, body):
    outcome = apns.classify(status, body)
    assert isinstance(outcome.action, apns.Action)
    assert outcome.timestamp_ms is None or status == 410


YAML_PIECES = st.sampled_from(
    [
        "database: ",
        "apns:\n",
        "  endpoint: ",
        "https://x",
        "  timeout: ",
        "0.5",
        "\n",
        "relay_peers: [",
        "]",
        "- ",
        "{",
        "}",
        "&a ",
        "*a",
        "!!python/object ",
        "'",
        '"',
        ":",
        "event_timeout: ",
        "1e9",
        "null",
        "yes",
        "\t",
        "\x00",
    ]
)


@FUZZ
@given(st.lists(st.one_of(YAML_PIECES, st.text(max_size=6)), max_size=30).map("".join))
def test_config_parser(text):
    try:
        parsed = config.parse(text, Path("/etc/dovenotify/dovenotify.yaml"))
    except config.ConfigError as e:
        assert str(e).startswith("/etc/dovenotify/dovenotify.yaml")
    else:
        assert isinstance(parsed, config.Config)


@settings(max_examples=100, deadline=2000)
@given(
    st.one_of(
        st.binary(max_size=400),
        st.sampled_from(
            [
                b"-----BEGIN CERTIFICATE-----\n",
                b"-----BEGIN PRIVATE KEY-----\n",
                b"MIIB",
                b"\n-----END CERTIFICATE-----\n",
                b"0\x82\x01\x00",
            ]
        ).flatmap(lambda head: st.binary(max_size=200).map(lambda tail: head + tail)),
    )
)
def test_certificate_loader(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cert") / "apns.pem"
    path.write_bytes(data)
    try:
        load_credentials(path)
    except CertificateError as e:
        assert str(path) in str(e)
