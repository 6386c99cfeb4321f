"""Following spool files live: inotify's events, offsets, partial lines, rotation."""

import errno
import os
import struct

import pytest

from dovenotify.core import inotify
from dovenotify.events import spool
from dovenotify.events.decoder import Event
from dovenotify.events.spool import Seen
from dovenotify.events.spooltail import SpoolTail

NEW = b"MessageNew\talice\tINBOX\tlmtp\n"
FLAGS = b"FlagsSet\talice\tINBOX\timap\n"
UID = 1000


def raw_event(wd: int, mask: int, name: bytes, cookie: int = 0) -> bytes:
    # The kernel pads a name with NULs (at least one) to an alignment.
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", wd, mask, cookie, len(padded)) + padded


def test_inotify_events_are_parsed_with_their_padded_names():
    buffer = (
        raw_event(1, inotify.IN_CREATE, b"1000")
        + raw_event(1, inotify.IN_CLOSE_WRITE, b"1000")
        + raw_event(-1, inotify.IN_Q_OVERFLOW, b"")
        + raw_event(1, inotify.IN_MOVED_TO, b"caf\xe9\xff", cookie=7)
    )
    events = inotify.parse(buffer)
    assert [(e.wd, e.mask, e.cookie, e.name) for e in events] == [
        (1, inotify.IN_CREATE, 0, "1000"),
        (1, inotify.IN_CLOSE_WRITE, 0, "1000"),
        (-1, inotify.IN_Q_OVERFLOW, 0, ""),
        (1, inotify.IN_MOVED_TO, 7, os.fsdecode(b"caf\xe9\xff")),
    ]
    # A hostile name's bytes come back for the calls that remove it.
    assert os.fsencode(events[3].name) == b"caf\xe9\xff"
    assert inotify.parse(b"") == []


def test_a_cut_inotify_buffer_is_an_error_not_a_wrong_event():
    whole = raw_event(1, inotify.IN_CREATE, b"1000")
    with pytest.raises(ValueError, match="names 16 bytes"):
        inotify.parse(whole[:-3])
    with pytest.raises(ValueError, match="after the last"):
        inotify.parse(whole + b"\0\0")


def test_the_kernel_says_when_a_writer_closes_a_file_it_appended_to(tmp_path):
    mask = inotify.IN_CLOSE_WRITE | inotify.IN_CREATE | inotify.IN_MOVED_TO
    watch = inotify.Watch.open(tmp_path, mask)
    try:
        assert watch.read() == []
        with open(tmp_path / "1000", "ab") as f:
            f.write(NEW)
        os.rename(tmp_path / "1000", tmp_path / "1000.draining")
        seen = [(e.mask & mask, e.name) for e in watch.read()]
        assert seen == [
            (inotify.IN_CREATE, "1000"),
            (inotify.IN_CLOSE_WRITE, "1000"),
            (inotify.IN_MOVED_TO, "1000.draining"),
        ]
    finally:
        watch.close()
    with pytest.raises(NotADirectoryError):
        inotify.Watch.open(tmp_path / "1000.draining", mask)


def test_a_watch_that_cannot_be_had_is_explained():
    limit = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "fs.inotify.max_user_watches" in inotify.cause(limit)
    assert inotify.cause(OSError(errno.EACCES, "Permission denied")) == "Permission denied"


def seen(
    data: bytes, start: int = 0, *, ino: int = 5, uid: int = UID, name: str = ""
) -> spool.Seen:
    size = start + len(data)
    return Seen(name or str(uid), ino, uid, 100, size, True, start, data)


def events(step) -> list[str]:
    return [item.name if isinstance(item, Event) else item.reason for item in step.items]


def test_each_line_is_handled_once_and_a_partial_line_when_complete():
    tail = SpoolTail(line_max=1024, budget=1 << 20)
    first = tail.took("1000", seen(NEW + FLAGS[:5]), now=0.0)
    assert events(first) == ["MessageNew"] and first.ended is None
    assert tail.known("1000") == (5, len(NEW) + 5)
    # The rest of the line arrives; then nothing new.
    second = tail.took("1000", seen(FLAGS[5:], len(NEW) + 5), now=1.0)
    assert events(second) == ["FlagsSet"] and second.tail is first.tail
    assert events(tail.took("1000", seen(b"", len(NEW + FLAGS)), now=2.0)) == []


def test_a_new_inode_or_a_truncated_file_is_read_from_its_start():
    tail = SpoolTail(line_max=1024, budget=1 << 20)
    old = tail.took("1000", seen(NEW), now=0.0).tail
    renewed = tail.took("1000", seen(FLAGS, ino=6), now=1.0)
    assert renewed.ended is old and renewed.tail is not old
    assert events(renewed) == ["FlagsSet"]
    # Shorter than read so far (spool.look then reads from 0): a new life too.
    again = tail.took("1000", seen(NEW, ino=6), now=2.0)
    assert again.ended is renewed.tail and events(again) == ["MessageNew"]
    gone = tail.took("1000", None, now=3.0)
    assert gone.ended is again.tail and tail.tails == {}


def test_what_is_not_a_regular_file_or_not_its_writers_is_removed():
    tail = SpoolTail(line_max=1024, budget=1 << 20)
    fifo = Seen("1000", 5, UID, 100, 0, regular=False)
    assert tail.took("1000", fifo, 0.0).remove
    # Made by uid 1000 under the name of 4242, before 4242 made its own.
    squat = tail.took("4242", seen(NEW, uid=UID, name="4242"), 0.0)
    assert (squat.remove, squat.squatted, squat.items) == (True, 4242, [])
    odd = tail.took("x", seen(NEW, uid=UID, name="x"), 0.0)
    assert (odd.remove, odd.squatted) == (True, None)
    assert tail.tails == {}


def test_a_file_is_read_no_further_than_its_budget():
    tail = SpoolTail(line_max=1024, budget=len(NEW) * 2)
    assert not tail.took("1000", seen(NEW), 0.0).overflow
    over = tail.took("1000", seen(NEW + NEW, len(NEW)), 1.0)
    assert over.overflow and over.remove and events(over) == ["MessageNew"]
    assert tail.tails == {}


def test_files_read_to_their_end_are_set_aside_when_big_or_quiet():
    tail = SpoolTail(line_max=1024, budget=1 << 20, rotate_bytes=100, quiet=10.0)
    tail.took("1000", seen(NEW), now=0.0)
    tail.took("1001", seen(NEW * 4, uid=1001), now=0.0)  # 116 bytes
    # Read in part (a pass is bounded): more to read, not to set aside.
    tail.took("1002", Seen("1002", 7, 1002, 100, 500, True, 0, NEW), now=0.0)
    assert tail.unread() == ["1002"]
    assert tail.due(1.0) == ["1001"]
    assert tail.next_due() == 10.0
    aside = tail.rotate("1001")
    assert aside.offset == len(NEW) * 4 and tail.known("1001") is None
    # Growing postpones being quiet.
    tail.took("1000", seen(FLAGS, len(NEW)), now=5.0)
    assert tail.due(12.0) == [] and tail.due(15.0) == ["1000"]
    # A new file under a name still being read aside waits for that to end.
    tail.took("1001", seen(NEW, ino=9, uid=1001), now=20.0)
    assert "1001" not in tail.due(40.0)
    tail.rotated("1001")
    assert "1001" in tail.due(40.0)


def test_look_reads_from_the_offset_of_the_same_inode_only(tmp_path):
    (tmp_path / "1000").write_bytes(NEW + FLAGS)
    os.chown(tmp_path / "1000", UID, 100)
    first = spool.look(tmp_path, "1000", None, 1024)
    assert first is not None and first.data == NEW + FLAGS and first.uid == UID
    later = spool.look(tmp_path, "1000", (first.ino, len(NEW)), 1024)
    assert later is not None and (later.start, later.data) == (len(NEW), FLAGS)
    # Bounded per look.
    assert spool.look(tmp_path, "1000", None, 10).data == NEW[:10]
    # Read to its end: nothing new, from where it was.
    unchanged = spool.look(tmp_path, "1000", (first.ino, first.size), 1024)
    assert unchanged is not None and (unchanged.start, unchanged.data) == (first.size, b"")
    (tmp_path / "1000").unlink()
    assert spool.look(tmp_path, "1000", (first.ino, 0), 1024) is None
    (tmp_path / "1000").symlink_to("/etc/passwd")
    link = spool.look(tmp_path, "1000", None, 1024)
    assert link is not None and not link.regular and link.data == b""


def test_looking_again_at_an_unchanged_file_reads_nothing_twice(tmp_path):
    """A writer that closes without writing, a rescan: the same file, nothing new."""
    tail = SpoolTail(line_max=1024, budget=1 << 20)
    name = str(os.getuid())
    (tmp_path / name).write_bytes(NEW + FLAGS[:5])
    steps = []
    for _ in range(3):
        steps.append(tail.took(name, spool.look(tmp_path, name, tail.known(name), 1024), 0.0))
    with open(tmp_path / name, "ab") as f:
        f.write(FLAGS[5:])
    steps.append(tail.took(name, spool.look(tmp_path, name, tail.known(name), 1024), 1.0))
    assert [events(step) for step in steps] == [["MessageNew"], [], [], ["FlagsSet"]]
    assert all(step.ended is None and step.tail is steps[0].tail for step in steps)


def test_a_file_that_cannot_be_read_is_left_alone_and_said_so():
    tail = SpoolTail(line_max=1024, budget=1 << 20)
    tail.took("1000", seen(NEW), 0.0)
    unreadable = Seen("1000", 5, UID, 100, 60, problem="Permission denied")
    step = tail.took("1000", unreadable, 1.0)
    assert (step.problem, step.remove, step.items) == ("Permission denied", False, [])
    assert step.ended is not None and tail.tails == {}
