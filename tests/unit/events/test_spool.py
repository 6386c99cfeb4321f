"""The spool directory: per-uid files handed over exactly once, read in bounded memory."""

import os
import tracemalloc

from dovenotify.events import spool

NEW = b"MessageNew\talice\tINBOX\tlmtp\n"
FLAGS = b"FlagsSet\talice\tINBOX\timap\n"


def read(spooled: spool.Spooled) -> bytes:
    data = b"".join(spool.chunks(spooled.path))
    spooled.path.unlink()
    return data


def test_rotation_keeps_what_a_writer_appends_after_it(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    own = spool.provide(path, 1000)
    with open(own, "ab", buffering=0) as writer:  # opened before the rotation
        writer.write(NEW)
        aside = spool.rotate(path, 1000)
        writer.write(FLAGS)  # ... and wrote just after
    assert aside.read_bytes() == NEW + FLAGS
    assert own.read_bytes() == b"" and os.stat(own).st_ino != os.stat(aside).st_ino


def test_an_old_single_spool_file_is_moved_aside_to_be_drained(tmp_path):
    path = tmp_path / "events.spool"
    path.write_bytes(NEW)
    spool.create(path)
    assert path.is_dir() and spool.legacy(path).read_bytes() == NEW


def test_set_aside_hands_lines_over_once_with_their_writer(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    assert spool.set_aside(path) == []
    with open(path / str(os.getuid()), "ab", buffering=0) as writer:  # opened before the drain
        writer.write(NEW)
        (found,) = spool.set_aside(path)
        writer.write(FLAGS)  # ... and wrote just after
    assert (found.uid, found.named_uid, found.squatted) == (os.getuid(), os.getuid(), False)
    assert read(found) == NEW + FLAGS
    assert not found.path.exists()
    assert spool.set_aside(path) == []


def test_a_file_named_for_another_uid_is_squatted(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    # Only an older dovenotify let writers make files: one of uid 4243's, named 4242.
    (path / "4242").write_bytes(NEW)
    os.chown(path / "4242", 4243, 4243)
    (found,) = spool.set_aside(path)
    assert found.squatted and found.named_uid == 4242 and found.uid == 4243


def test_what_a_crash_left_aside_is_read_and_no_fifo_or_link_is_followed(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    (path / "7").write_bytes(NEW)
    spool.set_aside(path)  # then the service died before reading
    os.mkfifo(path / "8")
    (path / "9").symlink_to("/etc/passwd")
    (found,) = spool.set_aside(path)
    assert read(found) == NEW
    # What remains: the fresh file put in place of the one set aside.
    assert os.listdir(path) == ["7"] and (path / "7").stat().st_size == 0


def test_a_big_spool_is_read_a_chunk_at_a_time(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    with open(path / "0", "ab") as writer:
        for n in range(200_000):
            writer.write(b"MessageNew\tuser%d@example.org\tINBOX\tlmtp\n" % n)
    (found,) = spool.set_aside(path)
    assert found.path.stat().st_size > 7_000_000
    tracemalloc.start()
    try:
        total = sum(len(chunk) for chunk in spool.chunks(found.path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total > 7_000_000
    assert peak < 1_000_000, peak


def test_a_file_is_appendable_by_its_uid_until_its_mode_takes_that_away(tmp_path):
    path = tmp_path / "events.spool"
    spool.create(path)
    own = spool.provide(path, 4241)
    assert spool.appendable(own, 4241) and not spool.appendable(own, 4242)
    # chmod on a file with an ACL sets its mask: the named user's write goes.
    own.chmod(0o600)
    assert not spool.appendable(own, 4241)
