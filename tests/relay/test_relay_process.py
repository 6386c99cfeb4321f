"""relay_process: separate: `dovenotify relay` holds the relayed IMAP sessions, so
`dovenotify serve` can be restarted under them. Real Dovecot, real TLS logins
through the post-login hook, the real APNs stand-in."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dovenotify.core.config import ConfigError, parse
from tests.admin.test_doctor import run_doctor
from tests.harness.dovecot import deliver
from tests.harness.service import dovenotify_command, run_service, write_config
from tests.harness.stack import run_stack, service_settings

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"
OTHER_ACCOUNT = "6B0A6C2E-3F1B-4C11-9B1E-0D2F5A7C9E11"
OTHER_TOKEN = "cd" * 32
SEPARATE = {"relay_process": "separate"}


async def test_restarting_serve_keeps_the_sessions_of_the_separate_relay(test_pki, dovecot_version):
    async with run_stack(test_pki, SEPARATE, version=dovecot_version) as stack:
        assert stack.relay is not None
        phone = await stack.iphone("alice")
        assert (await phone.command("SELECT INBOX")).ok

        assert await stack.service.stop() == 0
        async with run_service(stack.root / "service", stack.settings) as serve:
            # The same session, through the same relay process, did not notice.
            assert (await phone.command("NOOP")).ok
            registered = await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
            assert registered.ok, registered
            # The push side that came back reads what the relay stored.
            deliver(stack.dovecot, "alice", b"Subject: after the restart\r\n\r\nhi\r\n")
            request = await stack.standin.next_request()
            assert request.path == f"/3/device/{TOKEN}"
            assert request.body == b'{"aps":{"account-id":"%s"}}' % ACCOUNT.encode()
            # New logins still find the relay: stopping serve left its socket alone.
            bob = await stack.iphone("bob")
            assert (await bob.xapplepushservice(OTHER_ACCOUNT, OTHER_TOKEN, ["INBOX"])).ok
            assert (await phone.command("NOOP")).ok
            await bob.logout()
            await phone.logout()
            assert "relay left to `dovenotify relay`" in serve.log_text()
        relay_log = stack.relay.log_text()
        assert relay_log.count("registered alice account") == 1
        assert "registered bob account" in relay_log
        assert "registered" not in stack.service.log_text()
        assert "dovenotify-postlogin" not in stack.dovecot.log_text()


async def test_serve_does_not_bind_the_relay_socket_when_separate(test_pki, dovecot_version):
    async with run_stack(test_pki, SEPARATE, version=dovecot_version) as stack:
        assert stack.relay is not None
        relay_socket = Path(stack.settings["relay_socket"])
        phone = await stack.iphone("alice")
        assert (await phone.command("SELECT INBOX")).ok

        # Stopping the relay ends the sessions it holds, and takes its socket away.
        assert await stack.relay.stop() == 0
        with pytest.raises(EOFError):
            while True:
                await phone.read_response()
        await phone.aclose()
        assert not relay_socket.exists()
        assert "stopping on SIGTERM: 1 relayed session(s) end" in stack.relay.log_text()

        # A serve started now neither binds the relay socket nor answers on it...
        assert await stack.service.stop() == 0
        async with run_service(stack.root / "service", stack.settings):
            assert not relay_socket.exists()
            # ... so a login goes straight to Dovecot, which knows no XAPPLEPUSHSERVICE.
            direct = await stack.iphone("alice")
            refused = await direct.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
            assert refused.status == "BAD" and b"Unknown command" in refused.tagged
            assert (await direct.command("NOOP")).ok
            await direct.logout()
            assert "dovenotify-postlogin" in stack.dovecot.log_text()

            if stack.dovecot.installation.chroot is None:
                # doctor reads the host's Dovecot; it names the process to start.
                report = await run_doctor(stack.service.config_path, stack.dovecot.conf_path)
                assert report.verdicts["relay"][0] == "FAIL", report.output
                assert report.verdicts["relay"][2] == "start `dovenotify relay`"

            # And once `dovenotify relay` is back, logins register through it again.
            async with run_service(
                stack.root / "service", stack.settings, command="relay"
            ) as relay:
                phone = await stack.iphone("alice")
                assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
                await phone.logout()
                assert "registered alice account" in relay.log_text()


async def test_switching_to_separate_leaves_logins_no_gap(test_pki, dovecot_version):
    """The relay started first takes the socket over; the inline serve's stop then
    leaves it alone, so every login in between is relayed."""
    async with run_stack(test_pki, version=dovecot_version) as stack:
        assert stack.relay is None
        old = await stack.iphone("alice")
        assert (await old.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        separate = {**stack.settings, **SEPARATE}
        async with run_service(stack.root / "service", separate, command="relay") as relay:
            bob = await stack.iphone("bob")
            assert (await bob.xapplepushservice(OTHER_ACCOUNT, OTHER_TOKEN, ["INBOX"])).ok
            # The inline relay keeps the sessions it has until serve stops.
            assert (await old.command("NOOP")).ok
            assert await stack.service.stop() == 0
            with pytest.raises(EOFError):
                while True:
                    await old.read_response()
            await old.aclose()
            assert Path(stack.settings["relay_socket"]).exists()
            # Logins while serve is away, and after, go through the relay.
            alice = await stack.iphone("alice")
            assert (await alice.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
            async with run_service(stack.root / "service", separate):
                assert (await bob.command("NOOP")).ok
                deliver(stack.dovecot, "bob", b"Subject: switched\r\n\r\nhi\r\n")
                assert (await stack.standin.next_request()).path == f"/3/device/{OTHER_TOKEN}"
            await alice.logout()
            await bob.logout()
            assert "registered bob account" in relay.log_text()
            assert "registered alice account" in relay.log_text()
        assert "dovenotify-postlogin" not in stack.dovecot.log_text()


async def test_sighup_reloads_the_separate_relays_topic_and_keeps_sessions(
    tmp_path, test_pki, dovecot_version
):
    certificate = tmp_path / "push.pem"
    shutil.copyfile(test_pki.client.combined_pem, certificate)
    async with run_stack(test_pki, SEPARATE, version=dovecot_version) as stack:
        assert stack.relay is not None
        settings = {
            **stack.settings,
            "apns": {**stack.settings["apns"], "certificate": str(certificate)},
        }
        write_config(stack.relay.config_path, settings)
        phone = await stack.iphone("alice")
        assert (await phone.command("SELECT INBOX")).ok

        # A new certificate, for another topic, and a reload.
        shutil.copyfile(test_pki.client_with_topics.combined_pem, certificate)
        stack.relay.process.send_signal(signal.SIGHUP)
        await stack.relay.wait_for_log("reloaded: now telling devices topic")
        assert (await phone.command("NOOP")).ok
        reply = await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
        topic = test_pki.client_with_topics.topic
        assert topic != test_pki.client.topic
        assert reply.untagged[-1].endswith(b'aps-topic "%s"' % topic.encode()), reply
        assert "1 relayed session(s) go on" in stack.relay.log_text()
        await phone.logout()
        # The relay needs the credentials for the topic only: nobody spoke to APNs.
        assert stack.standin.peer_certificates == []


def test_relay_refuses_to_run_when_serve_runs_it(tmp_path, test_pki):
    settings = service_settings(tmp_path, test_pki, "https://127.0.0.1:1")
    config = write_config(tmp_path / "dovenotify.yaml", settings)
    result = subprocess.run(
        [*dovenotify_command(), "relay", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"dovenotify: {config} says relay_process: inline, so `dovenotify serve` runs the"
        " relay itself. To run it as a process of its own, set `relay_process: separate`"
        f" in {config}, start `dovenotify relay` (it takes the relay socket over), then"
        " restart `dovenotify serve`.\n"
    )
    # It took nothing from serve: no socket, no database.
    assert not Path(settings["relay_socket"]).exists()
    assert not Path(settings["database"]).exists()


def test_relay_process_takes_inline_or_separate_only():
    assert parse("relay_process: separate\n", Path("d.yaml")).relay_process == "separate"
    assert parse("log_level: info\n", Path("d.yaml")).relay_process == "inline"
    with pytest.raises(ConfigError) as error:
        parse("log_level: info\nrelay_process: seperate\n", Path("d.yaml"))
    assert str(error.value) == (
        "d.yaml line 2: relay_process: expected one of inline, separate, got 'seperate'"
    )
