"""Nothing in dovenotify may block or break Dovecot: logins and deliveries go on without it."""

import shutil
import socket
import time
from pathlib import Path

from tests.harness.dovecot import deliver, make_root
from tests.harness.imap_client import ImapClient
from tests.harness.stack import dovecot_snippet, service_settings


async def test_login_and_delivery_work_with_the_service_down(
    dovecot_factory, dovecot_version, test_pki
):
    root = make_root("dovenotify-down-")
    try:
        settings = service_settings(root, test_pki, "https://127.0.0.1:9", dovecot_version)
        dovecot = dovecot_factory(extra_conf=dovecot_snippet(root, settings, dovecot_version))

        started = time.perf_counter()
        client = await ImapClient.connect(
            dovecot.host, dovecot.imaps_port, ssl_context=dovecot.client_ssl_context()
        )
        login = await client.login("alice", "secret")
        assert login.ok
        assert (await client.command("SELECT INBOX")).ok
        login_seconds = time.perf_counter() - started
        # No relay to answer XAPPLEPUSHSERVICE: neither capability form offers it.
        assert b"[CAPABILITY " in login.tagged
        assert b"XAPPLEPUSHSERVICE" not in login.tagged
        assert "XAPPLEPUSHSERVICE" not in await client.capability()
        await client.logout()
        # A missing relay socket fails at once: no wait for relay_timeout.
        assert login_seconds < 0.5
        dovecot.wait_for_log(r"relay \S+ unavailable \(No such file or directory\); this session")

        # With no event socket the driver gives up at once too (timeouts: 0.2 s).
        assert deliver(dovecot, "alice", b"Subject: x\r\n\r\nx\r\n") < 0.4
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_login_goes_on_when_the_relay_hangs(dovecot_factory, dovecot_version, test_pki):
    root = make_root("dovenotify-hung-")
    try:
        settings = service_settings(root, test_pki, "https://127.0.0.1:9", dovecot_version)
        dovecot = dovecot_factory(extra_conf=dovecot_snippet(root, settings, dovecot_version))
        relay_path = Path(settings["relay_socket"])
        relay_path.parent.mkdir(mode=0o755)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
            hung.bind(str(relay_path))
            relay_path.chmod(0o666)
            hung.listen(8)  # accepts (in the kernel) but never answers

            started = time.perf_counter()
            client = await ImapClient.connect(
                dovecot.host, dovecot.imaps_port, ssl_context=dovecot.client_ssl_context()
            )
            assert (await client.login("alice", "secret")).ok
            assert (await client.command("NOOP")).ok
            elapsed = time.perf_counter() - started
            await client.logout()
        # relay_timeout is 0.5 s; the login waits for it once, then goes on.
        assert 0.5 <= elapsed < 1.5
        dovecot.wait_for_log(r"relay \S+ unavailable \(timed out\)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
