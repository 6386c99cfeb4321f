"""The service checks its directories at start and names what is missing, for whom."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dovenotify import directories
from dovenotify.config import Config
from tests.harness.service import dovenotify_command

# An unprivileged user that exists on every Debian system.
USER = "nobody"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory another user may read (pytest's tmp dirs are 0700)."""
    with tempfile.TemporaryDirectory() as name:
        path = Path(name)
        path.chmod(0o755)
        yield path


def serve_as_nobody(directory: Path, settings: str) -> subprocess.CompletedProcess[str]:
    config = directory / "dovenotify.yaml"
    config.write_text(settings)
    config.chmod(0o644)
    return subprocess.run(
        [
            *("setpriv", f"--reuid={USER}", "--regid=nogroup", "--clear-groups"),
            *dovenotify_command(),
            *("serve", "--config", str(config)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_directory_it_cannot_create_is_named_with_the_user(shared_dir: Path) -> None:
    state = shared_dir / "lib" / "dovenotify"
    result = serve_as_nobody(
        shared_dir,
        f"database: {state}/registrations.sqlite\n"
        f"event_socket: {shared_dir}/run/events.sock\n"
        f"relay_socket: {shared_dir}/run/relay.sock\n"
        f"event_spool: {state}/events.spool\n",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"the directory {state} does not exist and user nobody (uid 65534) cannot" in (
        result.stderr
    )
    assert f"install -d -o nobody -m 0755 {state}" in result.stderr
    assert f"the directory {shared_dir}/run does not exist" in result.stderr
    assert "`dovenotify setup`" in result.stderr


def test_a_directory_it_cannot_write_in_is_named_with_its_owner(shared_dir: Path) -> None:
    run = shared_dir / "run"
    run.mkdir(mode=0o755)
    result = serve_as_nobody(
        shared_dir,
        f"database: {run}/registrations.sqlite\n"
        f"event_socket: {run}/events.sock\n"
        f"relay_socket: {run}/relay.sock\n"
        f"event_spool: {run}/events.spool\n",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        f"user nobody (uid 65534) cannot write in {run} (owned by root:root, mode 0755):"
        f" chown nobody {run}"
    ) in result.stderr


def test_a_missing_run_directory_is_made_when_allowed(shared_dir: Path) -> None:
    run = shared_dir / "run" / "dovenotify"
    config = Config(
        path=shared_dir / "dovenotify.yaml",
        database=str(shared_dir / "registrations.sqlite"),
        event_socket=run / "events.sock",
        relay_socket=run / "relay.sock",
        event_spool=shared_dir / "events.spool",
    )
    umask = os.umask(0o077)  # as the units run the service
    try:
        directories.check(config)
    finally:
        os.umask(umask)
    assert run.is_dir()
    assert run.stat().st_mode & 0o777 == directories.RUN_MODE
