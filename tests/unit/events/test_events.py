"""The Lua driver's line format."""

from dovenotify.events.decoder import MAX_LINE, BadLine, Event, EventDecoder


def test_lines_in_any_chunks():
    data = b"MessageNew\talice\tINBOX\tlmtp\nFlagsSet\tbob\tA%09b%25\timap\textra\n"
    for size in (1, 5, len(data)):
        decoder = EventDecoder()
        out = []
        for i in range(0, len(data), size):
            out += decoder.feed(data[i : i + size])
        assert out + decoder.close() == [
            Event("MessageNew", "alice", "INBOX", "lmtp"),
            Event("FlagsSet", "bob", "A\tb%", "imap"),
        ]


def test_bad_lines_are_reported_and_skipped():
    decoder = EventDecoder()
    out = decoder.feed(
        b"Nope\talice\tINBOX\timap\nMessageNew\talice\n\xff\xfe\t\t\t\n"
        + b"x" * (MAX_LINE + 10)
        + b"\nMessageNew\tbob\tINBOX\tlmtp\nMessageNew\tcut"
    )
    assert [type(o) for o in out] == [BadLine, BadLine, BadLine, BadLine, Event]
    assert "unknown event" in out[0].reason
    assert "expected 4 fields" in out[1].reason
    assert out[2].reason == "not UTF-8"
    assert "longer than" in out[3].reason
    (last,) = decoder.close()
    assert "incomplete last line" in last.reason
