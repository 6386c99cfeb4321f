"""A private PostgreSQL server for tests and benchmarks: Debian's binaries, a temp cluster.

`running_postgres()` runs initdb in a fresh directory under /tmp as the
`postgres` user (PostgreSQL refuses to run as root), starts the postmaster
listening only on a unix socket in that directory, and stops it by its PID.
Nothing of the machine's own clusters is touched.

    with running_postgres() as pg:
        url = pg.create_database("t1")    # postgresql://postgres@/t1?host=/tmp/...

The `postgres_server` fixture is one server per test session; `postgres_url` a
fresh, empty database in it for each test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs
import psycopg
import pytest

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
PORT = 5432  # only names the socket file; nothing listens on TCP


def bin_dir() -> Path:
    """Debian keeps PostgreSQL's server binaries per major version: take the newest."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name),
    )
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: scripts/test installs Debian's postgresql package"
        )
    return found[-1].parent


@attrs.define
class Postgres:
    root: Path
    process: subprocess.Popen[bytes]
    _names: Iterator[int] = attrs.field(factory=itertools.count)

    @property
    def socket_dir(self) -> Path:
        return self.root

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; returns its URL."""
        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_text(self) -> str:
        return (self.root / "postgres.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, exit cleanly.
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _as_postgres() -> None:
    user = pwd.getpwnam("postgres")
    os.setgid(user.pw_gid)
    os.setuid(user.pw_uid)


@contextlib.contextmanager
def running_postgres(settings: dict[str, str] | None = None) -> Iterator[Postgres]:
    """A fresh cluster, started; stopped by PID and deleted afterwards."""
    binaries = bin_dir()
    root = Path(tempfile.mkdtemp(prefix="dovenotify-pg-", dir="/tmp"))
    user = pwd.getpwnam("postgres")
    os.chown(root, user.pw_uid, user.pw_gid)
    data = root / "data"
    try:
        subprocess.run(
            [binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            preexec_fn=_as_postgres,
            check=True,
            capture_output=True,
        )
        options = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{root}'",
            "port": str(PORT),
            "fsync": "on",
            "max_connections": "100",
            **(settings or {}),
        }
        with (data / "postgresql.auto.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in options.items())
        with (
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify,
            (root / "postgres.log").open("wb") as log,
        ):
            # Debian builds PostgreSQL with systemd support: it says READY=1 on
            # NOTIFY_SOCKET once it accepts connections, so nothing polls.
            notify.bind(str(root / "notify.sock"))
            os.chmod(root / "notify.sock", 0o666)
            os.chown(root / "postgres.log", user.pw_uid, user.pw_gid)
            process = subprocess.Popen(
                [binaries / "postgres", "-D", data],
                preexec_fn=_as_postgres,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "NOTIFY_SOCKET": str(root / "notify.sock")},
            )
            server = Postgres(root, process)
            try:
                _await_ready(server, notify)
            except BaseException:
                server.stop()
                raise
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _await_ready(server: Postgres, notify: socket.socket) -> None:
    notify.settimeout(START_TIMEOUT)
    try:
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    except TimeoutError:
        raise RuntimeError(f"postgres did not start:\n{server.log_text()}") from None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    return postgres_server.create_database()
