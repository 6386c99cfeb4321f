"""The README's install block, word for word, on fresh Debian 12 and 13 roots.

The block is read from README.md (after the `install-test: debian` marker), so the
README cannot drift from what works. Each case gets its own copy of a cached
debootstrap root (tests/harness/install_root.py) holding what a mail server has
before the README: Debian's Dovecot, running, and supervisord, running (no systemd
there). Dovecot is configured either as Debian ships it (system users, PAM, mbox)
or with virtual users under vmail; the only other change is its listening ports,
so that the test never takes the standard ones. After the block, a simulated iPhone
registers over IMAPS, an LMTP delivery must reach the APNs stand-in, and `doctor`
must pass with no traceback and no warning. Running `setup` again changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import trio

from tests.harness import install_root
from tests.harness.apns_standin import ApnsStandin
from tests.harness.certs import Pki
from tests.harness.chroot import command_prefix
from tests.harness.dovecot import free_ports
from tests.harness.imap_client import ImapClient

SOURCE = Path(__file__).resolve().parents[1]
README = SOURCE / "README.md"
# Where the admin unpacked the source, inside the root.
TREE = Path("/root/dovenotify")
STOP_TIMEOUT = 20.0
START_TIMEOUT = 20.0
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", "*.egg-info", "build", ".*_cache", ".hypothesis"
)


def readme_block(name: str) -> str:
    found = re.search(
        rf"<!-- install-test: {re.escape(name)} -->\n```sh\n(.*?)```", README.read_text(), re.S
    )
    assert found, f"README.md has no ```sh block after <!-- install-test: {name} -->"
    return found[1]


def test_readme_block_is_found() -> None:
    block = readme_block("debian")
    assert block.splitlines()[-1].startswith("dovenotify setup")


# --- Dovecot as the admin has it before the README -----------------------------------

VMAIL_23 = """\
mail_uid = vmail
mail_gid = vmail
mail_location = maildir:~/Maildir
passdb {
  driver = passwd-file
  args = /etc/dovecot/users
}
userdb {
  driver = passwd-file
  args = /etc/dovecot/users
}
"""
VMAIL_24 = """\
mail_uid = vmail
mail_gid = vmail
mail_driver = maildir
mail_path = ~/Maildir
mail_inbox_path =
passdb passwd-file {
  passwd_file_path = /etc/dovecot/users
}
userdb passwd-file {
  passwd_file_path = /etc/dovecot/users
}
"""


def local_conf(version: str, users: str, imaps_port: int) -> str:
    """Dovecot's local.conf: the test's ports, and virtual users if asked."""
    text = f"""\
listen = 127.0.0.1
log_path = /var/log/dovecot.log
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {imaps_port}
  }}
}}
"""
    if users == "vmail":
        text += VMAIL_23 if version == "2.3" else VMAIL_24
    return text


def prepare_users(root: Path, users: str) -> None:
    if users == "system":
        run_in(root, ["useradd", "--create-home", "alice"])
        run_in(root, ["chpasswd"], input="alice:secret\n")
    else:
        run_in(root, ["useradd", "--system", "--uid", "5000", "--user-group", "vmail"])
        run_in(root, ["install", "-d", "-o", "vmail", "-g", "vmail", "/var/vmail"])
        (root / "etc/dovecot/users").write_text("alice:{PLAIN}secret:5000:5000::/var/vmail/alice\n")


# --- running things in the root -------------------------------------------------------


def environment() -> dict[str, str]:
    """A login shell's environment, plus how this network reaches the package registry."""
    passed = {
        k: v
        for k, v in os.environ.items()
        if k.startswith("PIP_") or k.lower() in ("http_proxy", "https_proxy", "no_proxy")
    }
    return {
        "PATH": PATH,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        **passed,
    }


def run_in(
    root: Path, argv: Sequence[str], *, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*command_prefix(root), *argv],
        input=input,
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert result.returncode == 0, f"{argv} failed:\n{result.stdout}\n{result.stderr}"
    return result


async def run_in_async(root: Path, script: str) -> subprocess.CompletedProcess[bytes]:
    """`script` under bash in the root, while the test's loop serves the APNs stand-in."""
    return await trio.run_process(
        [*command_prefix(root), "bash", "-c", script],
        capture_stdout=True,
        stderr=subprocess.STDOUT,
        check=False,
        env=environment(),
    )


def start_daemon(root: Path, argv: Sequence[str]) -> None:
    """Start a daemon in the root; its output goes to a log there (it keeps the fds open)."""
    log = root / "var/log" / f"test-{Path(argv[0]).name}.log"
    with log.open("wb") as out:
        result = subprocess.run(
            [*command_prefix(root), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(),
            timeout=60,
        )
    assert result.returncode == 0, f"{argv} failed: {log.read_text()}"


def pid_from(path: Path) -> int:
    return int(path.read_text().split()[0])


def stop(pid: int) -> None:
    """SIGTERM `pid` (a daemon the test started in the root) and wait until it is gone."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        os.kill(pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], STOP_TIMEOUT)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            select.select([pidfd], [], [], STOP_TIMEOUT)
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def mail_server(version: str, users: str) -> Iterator[tuple[Path, int]]:
    """A fresh root with Dovecot and supervisord running; stopped and removed after."""
    root = install_root.fresh_copy(version)
    daemons: list[Path] = []
    try:
        # The host's trust store, for a network that inspects TLS on its way out.
        cert = os.environ.get("PIP_CERT")
        if cert and Path(cert).is_file():
            shutil.copyfile(cert, root / cert.lstrip("/"))
        prepare_users(root, users)
        (imaps_port,) = free_ports(1)
        (root / "etc/dovecot/local.conf").write_text(local_conf(version, users, imaps_port))
        start_daemon(root, ["supervisord", "-c", "/etc/supervisor/supervisord.conf"])
        daemons.append(root / "run/supervisord.pid")
        start_daemon(root, ["dovecot"])
        daemons.append(root / "run/dovecot/master.pid")
        yield root, imaps_port
    finally:
        for pidfile in daemons:
            with contextlib.suppress(FileNotFoundError, ValueError):
                stop(pid_from(pidfile))
        install_root.remove(root)


async def wait_for_imaps(port: int) -> None:
    with trio.fail_after(START_TIMEOUT):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                # Dovecot daemonized before its login processes listen: nothing to await.
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return


def trusting(root: Path) -> ssl.SSLContext:
    """Trust the root's own self-signed Dovecot certificate (Debian's snakeoil)."""
    context = ssl.create_default_context(cafile=str(root / "etc/ssl/certs/ssl-cert-snakeoil.pem"))
    context.check_hostname = False
    return context


# --- the test -------------------------------------------------------------------------


@pytest.mark.parametrize("users", ["system", "vmail"])
@pytest.mark.parametrize("version", ["2.3", "2.4"])
async def test_readme_install(
    version: str, users: str, test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    with mail_server(version, users) as (root, imaps_port):
        tree = root / TREE.relative_to("/")
        shutil.copytree(SOURCE, tree, ignore=IGNORED, symlinks=True)
        # The admin's certificate, and (as an admin with a configuration would have)
        # APNs pointed at the stand-in.
        shutil.copyfile(test_pki.client.combined_pem, tree / "push.pem")
        etc = root / "etc/dovenotify"
        etc.mkdir()
        shutil.copyfile(test_pki.ca_file, etc / "test-ca.pem")
        (etc / "dovenotify.yaml").write_text(
            "apns:\n"
            "  certificate: /etc/dovenotify/push.pem\n"
            f"  endpoint: {apns_standin.url}\n"
            "  ca_file: /etc/dovenotify/test-ca.pem\n"
        )
        await wait_for_imaps(imaps_port)

        block = readme_block("debian")
        installed = await run_in_async(root, f"set -e\ncd {TREE}\n{block}")
        output = installed.stdout.decode(errors="replace")
        assert installed.returncode == 0, output
        assert "Traceback" not in output
        assert "All checks passed." in output
        for did in ("created the system user dovenotify", "supervisorctl update"):
            assert did in output

        account, token = str(uuid.uuid4()).upper(), os.urandom(32).hex()
        client = await ImapClient.connect("127.0.0.1", imaps_port, ssl_context=trusting(root))
        async with client:
            assert (await client.login("alice", "secret")).ok
            assert (await client.xapplepushservice(account, token, ["INBOX"])).ok
            await client.logout()

        await trio.to_thread.run_sync(deliver, root / "run/dovecot/lmtp")
        request = await apns_standin.next_request()
        assert request.path == f"/3/device/{token}"
        assert request.json() == {"aps": {"account-id": account}}

        doctor = await run_in_async(root, "dovenotify doctor")
        report = doctor.stdout.decode(errors="replace")
        assert doctor.returncode == 0, report
        assert "Traceback" not in report
        assert "warn" not in report.lower()

        again = await run_in_async(root, f"cd {TREE} && {block.splitlines()[-1]}")
        again_output = again.stdout.decode(errors="replace")
        assert again.returncode == 0, again_output
        assert "nothing to change" in again_output
        assert [line for line in again_output.splitlines() if line.startswith("setup:")] == [
            "setup: nothing to change: dovenotify was already set up this way",
            "setup: checking the installation (dovenotify doctor):",
        ]


def deliver(lmtp_socket: Path) -> None:
    import smtplib

    with smtplib.LMTP(str(lmtp_socket), timeout=10) as lmtp:
        lmtp.sendmail(
            "sender@example.org", ["alice"], b"Subject: hello\r\n\r\nFrom the install test.\r\n"
        )
