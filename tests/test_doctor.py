"""`dovenotify doctor` against the real stack: all green when healthy, and each
breakage named with its fix."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import attrs
import trio

from dovenotify import doctor
from dovenotify.config import Config
from dovenotify.dovecot_config import (
    DEFAULT_EVENT_SOCKET,
    DEFAULT_LUA_SCRIPT,
    DEFAULT_RELAY_SOCKET,
    render_example,
)
from tests.harness.dovecot import installation, make_root
from tests.harness.dovecot import write_config as write_dovecot_config
from tests.harness.service import dovenotify_command, write_config
from tests.harness.stack import run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


@attrs.frozen
class Report:
    code: int
    output: str
    verdicts: dict[str, tuple[str, str, str]]  # check -> (ok/FAIL, summary, fix)


async def run_doctor(config: Path, dovecot_conf: Path) -> Report:
    result = await trio.run_process(
        [*dovenotify_command(), "doctor", "--config", str(config), "--dovecot-conf", dovecot_conf],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    output = result.stdout.decode()
    verdicts: dict[str, tuple[str, str, str]] = {}
    last = ""
    for line in output.splitlines():
        if match := re.match(r"(ok|FAIL)\s+(\S+)\s+(.*)$", line):
            last = match[2]
            verdicts[last] = (match[1], match[3], "")
        elif match := re.match(r"\s+fix: (.*)$", line):
            status, summary, _ = verdicts[last]
            verdicts[last] = (status, summary, match[1])
    return Report(result.returncode, output + result.stderr.decode(), verdicts)


async def test_doctor_passes_on_a_healthy_installation(test_pki):
    async with run_stack(test_pki, version=None) as stack:
        phone = await stack.iphone("alice")
        assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
        handshakes = len(stack.standin.peer_certificates)

        report = await run_doctor(stack.service.config_path, stack.dovecot.conf_path)

        assert report.code == 0, report.output
        assert list(report.verdicts) == [
            "config",
            "certificate",
            "dovecot",
            "sockets",
            "lua",
            "relay",
            "apns",
            "registrations",
        ]
        assert all(v[0] == "ok" for v in report.verdicts.values()), report.output
        assert test_pki.client.topic in report.verdicts["certificate"][1]
        assert "as nobody" in report.verdicts["lua"][1]
        assert "1 device(s) of 1 user(s)" in report.verdicts["registrations"][1]
        # The APNs check shook hands with our certificate and sent nothing.
        assert len(stack.standin.peer_certificates) == handshakes + 1
        assert len(stack.standin.requests) == 0
        # The relay probe never became a session: the phone's session is the only one.
        assert (await phone.command("NOOP")).ok
        assert "handoff" not in stack.service.log_text()
        await phone.logout()


async def test_doctor_names_each_breakage_and_its_fix(test_pki):
    overrides = {
        # Dovecot's internal user may no longer hand connections to the relay.
        "relay_peers": ["root"],
    }
    async with run_stack(test_pki, overrides, version=None) as stack:
        # A certificate the APNs stand-in does not trust, as after a botched renewal.
        settings = dict(stack.settings)
        settings["apns"] = {
            **settings["apns"],
            "certificate": str(test_pki.client_stranger.combined_pem),
        }
        config = write_config(stack.root / "doctor.yaml", settings)
        # The event socket closed to the mail user (e.g. a restrictive umask or a
        # hand-made directory).
        Path(settings["event_socket"]).chmod(0o600)
        Path(settings["event_spool"]).chmod(0o600)
        # Dovecot's configuration with an old snippet's capability line.
        conf = stack.dovecot.conf_path.read_text()
        broken = stack.dovecot.conf_path.with_name("broken.conf")
        broken.write_text(conf + "protocol imap {\n  imap_capability = +XAPPLEPUSHSERVICE\n}\n")

        report = await run_doctor(config, broken)

        assert report.code == 1, report.output
        v = report.verdicts
        assert v["config"][0] == v["certificate"][0] == v["registrations"][0] == "ok"
        assert v["dovecot"][:2] == (
            "FAIL",
            "imap_capability adds XAPPLEPUSHSERVICE (the relay advertises it)",
        )
        assert "dovenotify dovecot-config" in v["dovecot"][2]
        assert v["sockets"][0] == "FAIL"
        assert "nobody may not write to" in v["sockets"][1]
        assert "mode 0600" in v["sockets"][1]
        assert f"nobody may not write to {settings['event_spool']}" in v["sockets"][1]
        assert v["lua"][0] == "FAIL"
        assert "permission denied" in v["lua"][1].lower(), v["lua"]
        assert v["relay"][0] == "FAIL"
        assert "hung up on dovecot" in v["relay"][1]
        assert "add dovecot to relay_peers" in v["relay"][2]
        assert v["apns"][0] == "FAIL"
        assert "TLS failed" in v["apns"][1]
        assert "5 check(s) failed: dovecot, sockets, lua, relay, apns" in report.output


async def test_doctor_stops_at_a_bad_config(tmp_path):
    config = tmp_path / "dovenotify.yaml"
    config.write_text("apns:\n  certificat: /etc/push.pem\n")
    report = await run_doctor(config, Path("/nonexistent/dovecot.conf"))
    assert report.code == 1
    assert report.verdicts["config"][0] == "FAIL"
    assert "unknown key 'apns.certificat'" in report.verdicts["config"][1]
    assert "did you mean 'apns.certificate'" in report.verdicts["config"][1]
    assert report.verdicts["apns"][1] == "not checked: the config check failed"


async def test_doctor_reports_an_expired_certificate(tmp_path, test_pki):
    config = tmp_path / "dovenotify.yaml"
    config.write_text(f"apns:\n  certificate: {test_pki.client_expired.combined_pem}\n")
    report = await run_doctor(config, Path("/nonexistent/dovecot.conf"))
    assert report.code == 1
    status, summary, fix = report.verdicts["certificate"]
    assert status == "FAIL"
    assert "expired on" in summary
    assert "README: Certificates" in fix
    assert report.verdicts["apns"][1] == "not checked: the certificate check failed"


def test_doctor_reads_doveconf_of_both_versions(dovecot_version):
    """What the dovecot check reads, from the real doveconf of 2.3 and of 2.4."""
    root = make_root("dovenotify-doctor-")
    try:
        conf = write_dovecot_config(
            root, version=dovecot_version, extra_conf=render_example(dovecot_version)
        )
        doveconf = installation(dovecot_version).command("doveconf", "-c", str(conf))
        facts = doctor.read_dovecot(doveconf, None)
        assert facts.version == dovecot_version
        assert (facts.mail_user, facts.internal_user) == ("nobody", "dovecot")
        assert facts.lua_script == DEFAULT_LUA_SCRIPT
        assert facts.event_socket == DEFAULT_EVENT_SOCKET
        assert facts.relay_socket == DEFAULT_RELAY_SOCKET
        defaults = Config(path=root / "dovenotify.yaml")
        assert doctor.dovecot_problems(doveconf, facts, defaults) == []

        elsewhere = attrs.evolve(defaults, event_socket=Path("/run/other/events.sock"))
        assert doctor.dovecot_problems(doveconf, facts, elsewhere) == [
            f"the Lua driver uses {DEFAULT_EVENT_SOCKET} but event_socket is /run/other/events.sock"
        ]
        bare = write_dovecot_config(root, version=dovecot_version)
        doveconf = installation(dovecot_version).command("doveconf", "-c", str(bare))
        facts = doctor.read_dovecot(doveconf, None)
        assert doctor.dovecot_problems(doveconf, facts, defaults) == [
            "imap lacks mail plugins notify, push_notification, mail_lua, push_notification_lua",
            "lmtp lacks mail plugins notify, push_notification, mail_lua, push_notification_lua",
            "no push_notification Lua driver is configured",
            "imap does not run the dovenotify post-login helper",
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
