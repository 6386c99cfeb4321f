"""`dovenotify doctor` against the real stack: all green when healthy, and each
breakage named with its fix."""

from __future__ import annotations

import os
import re
import shlex
import shutil
from pathlib import Path

import attrs
import pytest
import trio

from dovenotify.admin import doctor
from dovenotify.core.config import Config
from dovenotify.dovecot.config import (
    DEFAULT_EVENT_SOCKET,
    DEFAULT_LUA_SCRIPT,
    DEFAULT_RELAY_SOCKET,
    render_example,
)
from dovenotify.store.base import Registration
from dovenotify.store.sqlite import SQLiteStore
from tests.harness.apns_standin import ApnsStandin
from tests.harness.certs import Pki
from tests.harness.dovecot import free_ports, installation, make_root
from tests.harness.dovecot import write_config as write_dovecot_config
from tests.harness.service import (
    SERVICE_USER,
    dovenotify_command,
    run_service,
    service_layout,
    write_config,
)
from tests.harness.stack import run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


@attrs.frozen
class Report:
    code: int
    output: str
    verdicts: dict[str, tuple[str, str, str]]  # check -> (ok/FAIL, summary, fix)


async def run_doctor(
    config: Path, dovecot_conf: Path, *args: str, env: dict[str, str] | None = None
) -> Report:
    result = await trio.run_process(
        [
            *dovenotify_command(),
            "doctor",
            "--config",
            str(config),
            "--dovecot-conf",
            dovecot_conf,
            *args,
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
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
        assert f"nobody cannot enter {settings['event_spool']}" in v["sockets"][1]
        assert v["lua"][0] == "FAIL"
        assert "permission denied" in v["lua"][1].lower(), v["lua"]
        assert v["relay"][0] == "FAIL"
        assert "hung up on dovecot" in v["relay"][1]
        assert "add dovecot to relay_peers" in v["relay"][2]
        assert v["apns"][0] == "FAIL"
        assert "TLS failed" in v["apns"][1]
        assert "5 check(s) failed: dovecot, sockets, lua, relay, apns" in report.output


async def test_doctor_names_bytecode_the_lua_of_dovecot_refuses(test_pki):
    async with run_stack(test_pki, version=None) as stack:
        # What an upgrade of Dovecot's Lua leaves: bytecode of another Lua version.
        bytecode = stack.root / "dovecot-files" / "dovenotify-driver.luac"
        bytecode.write_bytes(b"\x1bLua\x53" + bytecode.read_bytes()[5:])

        report = await run_doctor(stack.service.config_path, stack.dovecot.conf_path)

        assert report.code == 1, report.output
        status, summary, fix = report.verdicts["lua"]
        assert status == "FAIL"
        assert f"as nobody: dovenotify: {bytecode}: bad binary format" in summary
        assert "using the source instead, which is slower" in summary
        assert "dovenotify dovecot-config --install" in fix


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


# --- users it cannot find, system users, and files as the service sees them ----------


def doveconf_on_path(root: Path, version: str) -> dict[str, str]:
    """An environment whose `doveconf` is that of Dovecot `version` (the other one runs
    in its chroot), so the doctor runs as an admin runs it on either version."""
    bin_dir = root / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "doveconf"
    # The host's by its full path: this wrapper is the one on PATH now.
    argv = installation(version).command(shutil.which("doveconf") or "/usr/bin/doveconf")
    command = " ".join(shlex.quote(a) for a in argv)
    wrapper.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("mail_user", "problem"),
    [
        ("nosuchuser", "--mail-user: there is no user 'nosuchuser' on this system"),
        ("99999", "--mail-user: there is no user '99999' on this system"),
        ("", "--mail-user is empty, so it names no user"),
        (None, None),  # Debian's default: system users, mail_uid empty
    ],
)
async def test_doctor_names_users_it_cannot_find_and_checks_system_users(
    dovecot_version: str, test_pki: Pki, mail_user: str | None, problem: str | None
) -> None:
    root = make_root("dovenotify-doctor-")
    try:
        conf = write_dovecot_config(
            root, version=dovecot_version, extra_conf=render_example(dovecot_version)
        )
        conf.write_text(re.sub(r"(?m)^mail_[ug]id = .*$", "", conf.read_text()))
        database = root / "registrations.sqlite"
        # A system user ("nobody") has a device: that is a mail user to check as.
        store = SQLiteStore(database)
        store.register(Registration("nobody", ACCOUNT, TOKEN, test_pki.client.topic, ("INBOX",)))
        store.close()
        config = write_config(
            root / "dovenotify.yaml",
            {
                "database": str(database),
                "event_socket": str(DEFAULT_EVENT_SOCKET),
                "relay_socket": str(DEFAULT_RELAY_SOCKET),
                "apns": {"certificate": str(test_pki.client.combined_pem)},
            },
        )
        args = () if mail_user is None else ("--mail-user", mail_user)
        env = doveconf_on_path(root, dovecot_version)

        report = await run_doctor(config, conf, *args, env=env)

        assert "Traceback" not in report.output and "Error" not in report.output, report.output
        assert report.code == 1  # nothing is running here
        status, summary, fix = report.verdicts["dovecot"]
        if problem is None:
            assert status == "ok", report.output
            assert summary.endswith("mail users are system users: checking as nobody")
            assert (
                f"nobody may not write to {DEFAULT_EVENT_SOCKET}" in (report.verdicts["sockets"][1])
                or f"{DEFAULT_EVENT_SOCKET} does not exist" in report.verdicts["sockets"][1]
            )
        else:
            assert (status, summary) == ("FAIL", problem)
            assert "--mail-user" in fix
            assert report.verdicts["lua"][1] == "not checked: the dovecot check failed"
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_doctor_without_a_config_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "dovenotify.yaml"
    report = await run_doctor(missing, Path("/nonexistent/dovecot.conf"))
    assert report.code == 1
    assert report.verdicts["config"] == (
        "FAIL",
        f"there is no configuration file {missing}",
        "create it from dovenotify.example.yaml (`dovenotify setup` writes one), or name"
        " yours with --config FILE",
    )


async def test_doctor_names_a_missing_certificate_file(tmp_path: Path) -> None:
    config = tmp_path / "dovenotify.yaml"
    config.write_text(f"apns:\n  certificate: {tmp_path / 'push.pem'}\n")
    report = await run_doctor(config, Path("/nonexistent/dovecot.conf"))
    status, _, fix = report.verdicts["certificate"]
    assert status == "FAIL"
    assert fix.startswith(f"apns.certificate names {tmp_path / 'push.pem'}, which does not exist")
    assert "dovenotify cert import" in fix


@pytest.mark.parametrize("where", ["no such name", "nothing listening"])
async def test_doctor_tells_dns_from_refused_from_the_certificate(
    tmp_path: Path, test_pki: Pki, where: str
) -> None:
    (port,) = free_ports(1)
    host = "apns.invalid" if where == "no such name" else "127.0.0.1"
    config = tmp_path / "dovenotify.yaml"
    config.write_text(
        f"apns:\n  certificate: {test_pki.client.combined_pem}\n  endpoint: https://{host}:{port}\n"
    )
    report = await run_doctor(config, Path("/nonexistent/dovecot.conf"))
    status, summary, fix = report.verdicts["apns"]
    assert status == "FAIL"
    if where == "no such name":
        assert "DNS lookup of apns.invalid failed" in summary
        assert fix.startswith("this host cannot look up the APNs name")
    else:
        assert "cannot connect: Connection refused" in summary
        assert fix.startswith("nothing answered there")
    assert "certificate" not in fix


async def test_doctor_checks_the_certificate_as_the_service_user(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    root, settings = service_layout(test_pki, apns_standin.url, test_pki.client.combined_pem)
    try:
        certificate = Path(settings["apns"]["certificate"])
        async with run_service(root / "service", settings, user=SERVICE_USER) as service:
            config = service.config_path
            nowhere = Path("/nonexistent/dovecot.conf")
            assert (await run_doctor(config, nowhere)).verdicts["certificate"][0] == "ok"
            # What an import used to leave behind: root's alone.
            certificate.chmod(0o600)
            report = await run_doctor(config, nowhere)
        status, summary, fix = report.verdicts["certificate"]
        assert (status, summary) == (
            "FAIL",
            f"the service runs as {SERVICE_USER}, who cannot read {certificate}"
            " (Permission denied)",
        )
        assert fix.startswith(f"let {SERVICE_USER} read it: chgrp ")
    finally:
        shutil.rmtree(root)
