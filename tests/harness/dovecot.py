"""A real Dovecot for tests: started as root in its own directory, stopped by PID.

Each instance gets a fresh directory under /tmp (mode 0755, because Dovecot's
unprivileged users must traverse it; pytest's tmp dirs are 0700), free loopback
ports, virtual users from a passwd-file, maildir mail owned by nobody:nogroup and
a log file. The base configuration for 2.3 and for 2.4 lives in `base_config`;
tests add their own settings with `extra_conf`.

Both Dovecot versions run on every host: the host's own, and the other one from
a Debian chroot (tests/harness/chroot.py). The `dovecot_version` fixture is
parametrized over both, and `dovecot`/`dovecot_factory` use it, so a test that
takes either runs once per version. The chroot sees the host's /tmp and nothing
else of it: keep every file Dovecot must read (scripts, helpers, sockets) under
/tmp, e.g. in a `make_root()` directory.

    def test_x(dovecot):                      # alice/secret and bob/secret
        deliver(dovecot, "alice", b"Subject: hi\\r\\n\\r\\nhello\\r\\n")

    def test_y(dovecot_factory, dovecot_version):
        d = dovecot_factory(extra_conf=render(dovecot_version, ...), userdb_fields={...})
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import attrs
import pytest
import trustme

from dovenotify.core import inotify
from dovenotify.dovecot.config import VERSIONS, installed_dovecot_version
from dovenotify.events import spool
from tests.harness import chroot

MAIL_USER = "nobody"
MAIL_GROUP = "nogroup"
DEFAULT_USERS: Mapping[str, str] = {"alice": "secret", "bob": "secret"}
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


@attrs.frozen
class Installation:
    """A Dovecot the tests can run: the host's (chroot None) or the other version's."""

    version: str
    chroot: Path | None = None

    def command(self, *argv: str) -> list[str]:
        """`argv` as run against this installation (its binaries, its users)."""
        return [*(chroot.command_prefix(self.chroot) if self.chroot else []), *argv]

    def _etc(self, name: str) -> Path:
        return (self.chroot or Path("/")) / "etc" / name

    def uid(self, user: str) -> int:
        # The chroot has its own /etc/passwd: its dovecot user's uid can differ.
        return _id_from(self._etc("passwd"), user)

    def gid(self, group: str) -> int:
        return _id_from(self._etc("group"), group)


def _id_from(database: Path, name: str) -> int:
    for line in database.read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2])
    raise KeyError(f"no {name!r} in {database}")


@functools.cache
def host_dovecot_version() -> str:
    return installed_dovecot_version()


# One answer per version per test run, failures included: a chroot that cannot be
# built fails every test that needs it with the same reason, without retrying.
_installations: dict[str, Installation | chroot.ChrootError] = {}


def installation(version: str | None = None) -> Installation:
    """The Dovecot `version` ("2.3" or "2.4"; None: the host's), building its chroot if needed."""
    host = host_dovecot_version()
    version = version or host
    if version not in _installations:
        if version == host:
            _installations[version] = Installation(version)
        else:
            target = chroot.other_target(host)
            if version != target.version:
                raise ValueError(f"unsupported Dovecot version {version!r}; expected {VERSIONS}")
            try:
                _installations[version] = Installation(version, chroot.ensure(target))
            except chroot.ChrootError as e:
                _installations[version] = e
    found = _installations[version]
    if isinstance(found, chroot.ChrootError):
        raise found
    return found


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, so no duplicates).

    They are released before Dovecot binds them: another process could take one
    in between, which is rare on loopback and shows up as "Address already in use".
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def make_root(prefix: str = "dovenotify-") -> Path:
    """A fresh directory Dovecot's unprivileged users can traverse."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    return root


@attrs.frozen
class Ports:
    imap: int
    imaps: int
    lmtp: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_ports(3))


@attrs.frozen
class Layout:
    """Where things live inside one instance's root."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def passwd(self) -> Path:
        return self.root / "passwd"

    @property
    def base_dir(self) -> Path:
        return self.root / "run"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def homes(self) -> Path:
        return self.root / "home"

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    @property
    def stderr(self) -> Path:
        return self.root / "dovecot.stderr"

    @property
    def cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def key(self) -> Path:
        return self.root / "server.key"


def base_config(version: str, layout: Layout, ports: Ports) -> str:
    """Dovecot's main configuration for tests, in the syntax of `version`."""
    r = layout
    if version == "2.3":
        return f"""\
base_dir = {r.base_dir}
state_dir = {r.state_dir}
log_path = {r.log}
protocols = imap lmtp
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = {MAIL_USER}
mail_gid = {MAIL_GROUP}
mail_location = maildir:~/Maildir
disable_plaintext_auth = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = {r.passwd}
}}
userdb {{
  driver = passwd-file
  args = {r.passwd}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
ssl = yes
ssl_cert = <{r.cert}
ssl_key = <{r.key}
service imap-login {{
  inet_listener imap {{
    port = {ports.imap}
  }}
  inet_listener imaps {{
    port = {ports.imaps}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {ports.lmtp}
  }}
}}
"""
    if version == "2.4":
        # Settings renamed, named passdb/userdb blocks, boolean lists; checked
        # against 2.4.1 in the chroot (tests/harness/chroot.py).
        return f"""\
dovecot_config_version = 2.4.0
dovecot_storage_version = 2.4.0
base_dir = {r.base_dir}
state_dir = {r.state_dir}
log_path = {r.log}
protocols {{
  imap = yes
  lmtp = yes
}}
listen = 127.0.0.1
default_internal_user = dovecot
default_login_user = dovenull
mail_uid = {MAIL_USER}
mail_gid = {MAIL_GROUP}
mail_driver = maildir
mail_path = ~/Maildir
auth_allow_cleartext = yes
auth_mechanisms = plain login
passdb passwd-file {{
  passwd_file_path = {r.passwd}
}}
userdb passwd-file {{
  passwd_file_path = {r.passwd}
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
ssl = yes
ssl_server_cert_file = {r.cert}
ssl_server_key_file = {r.key}
service imap-login {{
  inet_listener imap {{
    port = {ports.imap}
  }}
  inet_listener imaps {{
    port = {ports.imaps}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    port = {ports.lmtp}
  }}
}}
"""
    raise ValueError(f"unsupported Dovecot version {version!r}")


def passwd_file(
    layout: Layout,
    users: Mapping[str, str],
    userdb_fields: Mapping[str, Mapping[str, str]],
    uid: int,
    gid: int,
) -> str:
    """passwd-file lines: user:{PLAIN}password:uid:gid::home::userdb_extra_fields."""
    lines = []
    for name, password in users.items():
        extra = " ".join(f"userdb_{k}={v}" for k, v in userdb_fields.get(name, {}).items())
        lines.append(f"{name}:{{PLAIN}}{password}:{uid}:{gid}::{layout.homes / name}::{extra}\n")
    return "".join(lines)


def write_config(
    root: Path,
    *,
    version: str | None = None,
    ports: Ports | None = None,
    users: Mapping[str, str] = DEFAULT_USERS,
    userdb_fields: Mapping[str, Mapping[str, str]] | None = None,
    extra_conf: str = "",
    ca: trustme.CA | None = None,
) -> Path:
    """Write what Dovecot `version` (None: the host's) needs into `root`; return the conf path."""
    dovecot = installation(version)
    layout = Layout(root)
    ports = ports or Ports.pick()
    ca = ca or trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_pem.write_to_path(str(layout.key))
    cert.cert_chain_pems[0].write_to_path(str(layout.cert))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(layout.cert), append=True)
    uid, gid = dovecot.uid(MAIL_USER), dovecot.gid(MAIL_GROUP)
    layout.passwd.write_text(passwd_file(layout, users, userdb_fields or {}, uid, gid))
    layout.homes.mkdir(exist_ok=True)
    os.chown(layout.homes, uid, gid)
    layout.homes.chmod(0o755)
    config = base_config(dovecot.version, layout, ports)
    if extra_conf:
        config += "\n# --- extra_conf ---\n" + extra_conf
    layout.conf.write_text(config)
    return layout.conf


@attrs.define
class Dovecot:
    root: Path
    installation: Installation
    imap_port: int
    imaps_port: int
    lmtp_port: int
    ca: trustme.CA
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def version(self) -> str:
        return self.installation.version

    @property
    def layout(self) -> Layout:
        return Layout(self.root)

    @property
    def log_path(self) -> Path:
        return self.layout.log

    @property
    def conf_path(self) -> Path:
        return self.layout.conf

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this instance's certificate."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log matches `pattern` (Dovecot writes its log asynchronously)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log_text())
            if match is not None:
                return match
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in the Dovecot log:\n{self.log_text()}")
            time.sleep(0.01)

    def terminate(self) -> None:
        """Tell this instance's master (by its PID) to stop; `stop` also waits for it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Stop this instance's master by its PID and wait for it."""
        self.terminate()
        self.wait_exit()

    def wait_exit(self) -> None:
        """Wait for the master to exit; kill it if it takes longer than STOP_TIMEOUT."""
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# Dovecot 2.3's master sleeps a fixed second on every stop, after it has closed its
# listeners (services_monitor_wait_and_kill() in its service-monitor.c); 2.4 exits
# at once. So fixtures terminate their instances at teardown and leave the waiting
# and the removal of their directories to `stop_later`, which does both as the
# instances exit, and for the rest when the Python process exits.
_stopping: list[tuple[Dovecot, tuple[Path, ...]]] = []


def stop_later(d: Dovecot, *remove: Path) -> None:
    """Terminate `d` now; wait for it and remove the `remove` directories later."""
    d.terminate()
    _stopping.append((d, remove))
    _reap(wait=False)


def _reap(*, wait: bool) -> None:
    for entry in list(_stopping):
        d, remove = entry
        if wait:
            d.wait_exit()
        elif d.process.poll() is None:
            continue
        for directory in remove:
            shutil.rmtree(directory, ignore_errors=True)
        _stopping.remove(entry)


atexit.register(_reap, wait=True)


def _await_ready(d: Dovecot) -> None:
    """Until both the IMAP greeting and the LMTP greeting arrive, or Dovecot exits."""
    deadline = time.monotonic() + START_TIMEOUT
    # greeting expected, and a polite goodbye so the log stays quiet
    pending = {d.imap_port: (b"* OK", b"a LOGOUT\r\n"), d.lmtp_port: (b"220 ", b"QUIT\r\n")}
    while pending:
        if d.process.poll() is not None:
            raise RuntimeError(
                f"dovecot exited with {d.process.returncode}:\n"
                f"{d.layout.stderr.read_text(errors='replace')}\n{d.log_text()}"
            )
        if time.monotonic() > deadline:
            d.stop()
            raise RuntimeError(f"dovecot did not become ready:\n{d.log_text()}")
        for port, (greeting, goodbye) in list(pending.items()):
            with (
                contextlib.suppress(OSError),
                socket.create_connection((d.host, port), timeout=1.0) as s,
            ):
                if s.recv(64).startswith(greeting):
                    del pending[port]
                    s.sendall(goodbye)
        if pending:
            time.sleep(0.01)


def start_dovecot(
    root: Path,
    *,
    version: str | None = None,
    users: Mapping[str, str] = DEFAULT_USERS,
    userdb_fields: Mapping[str, Mapping[str, str]] | None = None,
    extra_conf: str = "",
    ca: trustme.CA | None = None,
) -> Dovecot:
    """Start Dovecot `version` (None: the host's) in the foreground, its files in `root`.

    `root` must be under /tmp and traversable by Dovecot's users (see `make_root`).
    `userdb_fields` adds userdb extra fields per user, e.g. {"alice": {"push": "a@x"}}.
    """
    dovecot = installation(version)
    ports = Ports.pick()
    ca = ca or trustme.CA()
    conf = write_config(
        root,
        version=dovecot.version,
        ports=ports,
        users=users,
        userdb_fields=userdb_fields,
        extra_conf=extra_conf,
        ca=ca,
    )
    layout = Layout(root)
    with layout.stderr.open("wb") as stderr:
        process = subprocess.Popen(
            dovecot.command("dovecot", "-F", "-c", str(conf)),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
        )
    d = Dovecot(root, dovecot, ports.imap, ports.imaps, ports.lmtp, ca, process)
    try:
        _await_ready(d)
    except BaseException:
        d.stop()
        raise
    return d


@contextlib.contextmanager
def running_dovecot(**kwargs) -> Iterator[Dovecot]:
    """start_dovecot in a fresh root; stop it and remove the root afterwards."""
    root = make_root()
    d = start_dovecot(root, **kwargs)
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(root, ignore_errors=True)


def deliver(
    d: Dovecot,
    rcpt: str,
    message: bytes,
    sender: str = "sender@example.org",
) -> float:
    """Deliver `message` over LMTP; return the seconds from DATA to the final reply."""
    message = re.sub(rb"(?<!\r)\n", b"\r\n", message)
    with smtplib.LMTP(d.host, d.lmtp_port, timeout=10) as lmtp:
        # A recipient's +detail may name a folder in UTF-8 (2.4 takes it; 2.3 answers 501).
        lmtp.command_encoding = "utf-8"
        code, reply = lmtp.mail(sender)
        assert code == 250, (code, reply)
        code, reply = lmtp.rcpt(rcpt)
        assert code == 250, (code, reply)
        start = time.perf_counter()
        code, reply = lmtp.data(message)
        elapsed = time.perf_counter() - start
        assert code == 250, (code, reply)
    return elapsed


def put_message(d: Dovecot, user: str, message: bytes, name: str, flags: str = "") -> None:
    """Write `message` into `user`'s maildir as file `name`, as a delivery would, but
    in no time: for seeding hundreds of messages. With `flags` (maildir letters,
    e.g. "FS") it goes to cur/, without to new/."""
    home = d.layout.homes / user
    maildir = home / "Maildir"
    uid, gid = d.installation.uid(MAIL_USER), d.installation.gid(MAIL_GROUP)
    for directory in (home, maildir, *(maildir / sub for sub in ("cur", "new", "tmp"))):
        if not directory.is_dir():
            directory.mkdir(mode=0o700)
            os.chown(directory, uid, gid)
    path = maildir / ("cur" if flags else "new") / (f"{name}:2,{flags}" if flags else name)
    path.write_bytes(message)
    os.chown(path, uid, gid)


def deliver_lda(
    d: Dovecot,
    rcpt: str,
    message: bytes,
    sender: str = "sender@example.org",
    mailbox: str | None = None,
) -> None:
    """Deliver `message` with dovecot-lda of `d`'s version, as an MTA's pipe would
    (into `mailbox`, UTF-8, if given: `-m`)."""
    lda = d.installation.command(
        "/usr/lib/dovecot/dovecot-lda", "-c", str(d.conf_path), "-d", rcpt, "-f", sender
    )
    if mailbox is not None:
        lda += ["-m", mailbox]
    result = subprocess.run(lda, input=message, capture_output=True, timeout=30)
    assert result.returncode == 0, result


class EventSink:
    """A unix-socket listener standing in for dovenotify's event socket.

    Collects every complete line the Lua driver sends, in a thread, so that it
    works from sync and trio tests alike. Created mode 0666: the driver runs as
    the mail uid. `hang=True` accepts connections and never reads them.
    """

    def __init__(self, path: Path, *, hang: bool = False) -> None:
        self.path = path
        self.hang = hang
        self.lines: list[str] = []
        self.payloads: list[bytes] = []  # everything received, one entry per connection
        self.connections = 0
        self._held: list[socket.socket] = []
        self._changed = threading.Condition()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        path.chmod(0o666)
        self._server.listen(16)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._changed:
                self.connections += 1
                self._changed.notify_all()
            if self.hang:
                self._held.append(conn)
                continue
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            # An unterminated last line is what a timed-out send leaves: drop it.
            complete = data[: data.rfind(b"\n") + 1].decode("utf-8")
            with self._changed:
                self.payloads.append(data)
                self.lines.extend(complete.splitlines(keepends=True))
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[EventSink], bool], timeout: float = 5.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self), timeout):
                raise AssertionError(f"timed out; lines so far: {self.lines!r}")

    def wait_lines(self, count: int, timeout: float = 5.0) -> list[str]:
        self.wait_for(lambda sink: len(sink.lines) >= count, timeout)
        return list(self.lines)

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self) -> EventSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SpoolSink:
    """dovenotify's event spool, made as the service makes it, and read as it reads it.

    The directory is created by `spool.create`, with a file for each of `uids`
    (the Lua driver's uid: the mail uid). `wait_for` reads what was appended
    since, until the predicate holds.
    """

    def __init__(self, path: Path, uids: Iterable[int]) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offsets: dict[str, int] = {}
        self._partial: dict[str, bytes] = {}
        assert spool.create(path) is None
        for uid in uids:
            spool.provide(path, uid)

    def poll(self) -> None:
        for entry in sorted(self.path.iterdir()):
            with entry.open("rb") as f:
                f.seek(self._offsets.get(entry.name, 0))
                data = self._partial.get(entry.name, b"") + f.read()
                self._offsets[entry.name] = f.tell()
            complete, _, self._partial[entry.name] = data.rpartition(b"\n")
            if complete:
                self.lines.extend((complete + b"\n").decode().splitlines(keepends=True))

    def wait_for(self, predicate: Callable[[SpoolSink], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        # Watching before each look: a write between the two still wakes us.
        watch = inotify.Watch.open(self.path, inotify.IN_CLOSE_WRITE)
        try:
            while True:
                self.poll()
                if predicate(self):
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; lines so far: {self.lines!r}")
                select.select([watch.fd], [], [], left)
                watch.read()
        finally:
            watch.close()

    def wait_lines(self, count: int, timeout: float = 5.0) -> list[str]:
        self.wait_for(lambda sink: len(sink.lines) >= count, timeout)
        return list(self.lines)


# --- pytest fixtures ---------------------------------------------------------

StartDovecot = Callable[..., Dovecot]


@pytest.fixture(params=VERSIONS, ids=lambda version: f"dovecot{version}")
def dovecot_version(request: pytest.FixtureRequest) -> str:
    """Each supported Dovecot version in turn: a test that takes this runs once per version.

    `dovecot` and `dovecot_factory` take it already; with the whole stack, pass it
    on: `run_stack(test_pki, version=dovecot_version)`. Programs of that version
    (doveadm, doveconf) run with `d.installation.command(...)`. `-k dovecot2.4`
    selects one version's runs.

    The version the host does not run comes from a chroot that is built on first
    use; if it cannot be built, the test fails with the reason (CI must test both).
    """
    installation(request.param)
    return request.param


@pytest.fixture
def dovecot_factory(dovecot_version: str) -> Iterator[StartDovecot]:
    """A function `start(**start_dovecot kwargs) -> Dovecot`; all are stopped at teardown.

    Starts the `dovecot_version` under test unless given `version=`.
    """
    started: list[tuple[Path, Dovecot]] = []

    def start(**kwargs) -> Dovecot:
        root = make_root()
        try:
            d = start_dovecot(root, **{"version": dovecot_version, **kwargs})
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        started.append((root, d))
        return d

    yield start
    for root, d in started:
        stop_later(d, root)


@pytest.fixture
def dovecot(dovecot_factory: StartDovecot) -> Dovecot:
    """A running Dovecot with users alice and bob (password "secret"), no dovenotify."""
    return dovecot_factory()
