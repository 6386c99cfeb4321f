"""The spool hands its lines over exactly once and never disappears under writers."""

import os
import tracemalloc

from dovenotify.events import spool
from dovenotify.events.decoder import Event

NEW = b"MessageNew\talice\tINBOX\tlmtp\n"
FLAGS = b"FlagsSet\talice\tINBOX\timap\n"


def test_set_aside_then_take_hands_lines_over_once(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    assert os.stat(path).st_mode & 0o777 == spool.MODE
    assert not spool.set_aside(path)
    with open(path, "ab", buffering=0) as writer:  # a writer that opened the file before the drain
        writer.write(NEW)
        assert spool.set_aside(path)
        assert path.exists() and path.stat().st_size == 0
        writer.write(FLAGS)  # ... and wrote just after
    assert spool.take_aside(path) == [
        Event("MessageNew", "alice", "INBOX", "lmtp"),
        Event("FlagsSet", "alice", "INBOX", "imap"),
    ]
    assert spool.take_aside(path) == []
    assert os.stat(path).st_mode & 0o777 == spool.MODE


def test_lines_set_aside_before_a_crash_are_read_first(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    path.write_bytes(NEW)
    assert spool.set_aside(path)  # then the service died before reading
    path.write_bytes(FLAGS)
    assert spool.set_aside(path)
    assert [e.name for e in spool.take_aside(path)] == ["MessageNew"]
    assert spool.set_aside(path)
    assert [e.name for e in spool.take_aside(path)] == ["FlagsSet"]


def test_a_long_outage_spool_is_read_in_the_memory_of_its_distinct_lines(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    lines = [b"MessageNew\tuser%d@example.org\tINBOX\tlmtp\n" % n for n in range(100)]
    with path.open("ab") as writer:
        for _ in range(2000):
            writer.write(b"".join(lines))
    assert path.stat().st_size > 7_000_000
    assert spool.set_aside(path)
    tracemalloc.start()
    try:
        events = spool.take_aside(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [e.username for e in events] == [f"user{n}@example.org" for n in range(100)]
    # A chunk and its lines at a time, not the whole file (nor an object per line).
    assert peak < 2_000_000, peak
