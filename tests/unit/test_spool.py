"""The spool hands its lines over exactly once and never disappears under writers."""

import os

from dovenotify import spool


def test_set_aside_then_take_hands_lines_over_once(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    assert os.stat(path).st_mode & 0o777 == spool.MODE
    assert not spool.set_aside(path)
    with open(path, "ab", buffering=0) as writer:  # a writer that opened the file before the drain
        writer.write(b"MessageNew\talice\tINBOX\tlmtp\n")
        assert spool.set_aside(path)
        assert path.exists() and path.stat().st_size == 0
        writer.write(b"FlagsSet\talice\tINBOX\timap\n")  # ... and wrote just after
    assert spool.take_aside(path) == (
        b"MessageNew\talice\tINBOX\tlmtp\nFlagsSet\talice\tINBOX\timap\n"
    )
    assert spool.take_aside(path) == b""
    assert os.stat(path).st_mode & 0o777 == spool.MODE


def test_lines_set_aside_before_a_crash_are_read_first(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    path.write_bytes(b"old\n")
    assert spool.set_aside(path)  # then the service died before reading
    path.write_bytes(b"new\n")
    assert spool.set_aside(path)
    assert spool.take_aside(path) == b"old\n"
    assert spool.set_aside(path)
    assert spool.take_aside(path) == b"new\n"
