"""`dovenotify setup`'s steps that need no Debian root: writing the configuration.

The whole command runs in tests/cli/test_install.py, on fresh Debian roots.
"""

from __future__ import annotations

import grp
import pwd
from pathlib import Path

import pytest

from dovenotify.cli import setup
from dovenotify.core import config as configuration

USER = pwd.getpwnam("nobody")


def test_a_configuration_is_written_only_when_there_is_none(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "dovenotify.yaml"
    report = setup.Report()
    setup.write_config(path, Path("push.pem"), Path("push.key"), USER, report)

    loaded = configuration.load(path)
    assert loaded.apns.certificate == path.parent / "push.pem"
    assert loaded.apns.key == path.parent / "push.key"
    assert (path.stat().st_mode & 0o777, path.stat().st_gid) == (0o640, USER.pw_gid)
    assert path.parent.stat().st_mode & 0o777 == 0o750
    assert f"wrote {path}" in report.changed

    path.write_text("log_level: debug\n")
    again = setup.Report()
    setup.write_config(path, Path("other.pem"), None, USER, again)
    assert path.read_text() == "log_level: debug\n"
    assert again.changed == []


def test_without_a_configuration_the_certificate_is_asked_for(tmp_path: Path) -> None:
    with pytest.raises(setup.SetupError, match="give your APNs certificate with --certificate"):
        setup.write_config(tmp_path / "dovenotify.yaml", None, None, USER, setup.Report())
    assert not (tmp_path / "dovenotify.yaml").exists()


def test_owner_and_mode_are_fixed_and_reported_once(tmp_path: Path) -> None:
    target = tmp_path / "state"
    report = setup.Report()
    setup.ensure_directory(target, USER.pw_uid, USER.pw_gid, 0o755, report)
    group = grp.getgrgid(USER.pw_gid).gr_name
    assert report.changed[:2] == [f"created {target}", f"made {target} owned by nobody:{group}"]
    again = setup.Report()
    setup.ensure_directory(target, USER.pw_uid, USER.pw_gid, 0o755, again)
    assert again.changed == []


@pytest.mark.parametrize(
    ("status", "up"),
    [
        ("dovenotify                       RUNNING   pid 12, uptime 0:01:02\n", True),
        ("dovenotify                       STARTING  \n", True),
        ("dovenotify                       STOPPED   Dec 06 02:06 AM\n", False),
        ("dovenotify                       FATAL     Exited too quickly\n", False),
        ("dovenotify: ERROR (no such process)\n", False),
    ],
)
def test_a_program_still_in_startsecs_counts_as_up(status: str, up: bool) -> None:
    assert setup._supervised_up(status) is up
