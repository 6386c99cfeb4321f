"""docker-mailserver's user-patches.sh, run against a copy of Debian's /etc/dovecot.

Docker cannot run here, so the script runs on the host with its paths pointed
into a temporary tree (the variables it documents), once per Dovecot version:
Debian 12's layout for 2.3 (DMS v15), Debian 13's for 2.4 (DMS edge).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import trio
import yaml

from tests.harness.dovecot import deliver, installation, make_root, start_dovecot
from tests.harness.imap_client import ImapClient
from tests.harness.service import dovenotify_command, run_service, write_config
from tests.harness.stack import service_settings

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dovecot-conf" / "docker-mailserver" / "user-patches.sh"
PROGRAM = REPO / "dovecot-conf" / "supervisord" / "dovenotify.conf"
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


class Container:
    """The parts of a docker-mailserver container the script touches, under `root`."""

    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.version = version
        self.dms_config = root / "dms-config"
        self.etc_dovecot = root / "etc" / "dovecot"
        self.etc_dovenotify = root / "etc" / "dovenotify"
        self.supervisor = root / "supervisor"
        share = root / "share"
        (share / "supervisord").mkdir(parents=True)
        # Where the Dockerfile installs the shipped program section.
        shutil.copy(PROGRAM, share / "supervisord" / "dovenotify.conf")
        self.supervisor.mkdir()
        self.dms_config.mkdir()
        dovecot = installation(version)
        shutil.copytree(
            (dovecot.chroot or Path("/")) / "etc" / "dovecot", self.etc_dovecot, symlinks=True
        )
        self.env = {
            **os.environ,
            "DMS_CONFIG": str(self.dms_config),
            "DOVECOT_CONF_DIR": str(self.etc_dovecot),
            "DOVENOTIFY_ETC": str(self.etc_dovenotify),
            "DOVENOTIFY_STATE": str(root / "state"),
            "DOVENOTIFY_RUN": str(root / "run"),
            "DOVENOTIFY_SHARE": str(share),
            "DOVENOTIFY_FILES": str(root / "dovecot-files"),
            "SUPERVISOR_CONF_DIR": str(self.supervisor),
            "DOVENOTIFY": dovenotify_command()[0],
            "SUPERVISORCTL": "",
            "DOVECOT_VERSION": version,
            # The image has a dovenotify user; the test host need not.
            "SERVICE_USER": "root",
        }

    def user_patches(self) -> str:
        result = subprocess.run(
            ["bash", str(SCRIPT)], env=self.env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    @property
    def snippet_path(self) -> Path:
        return self.etc_dovecot / "conf.d" / "95-dovenotify.conf"

    def doveconf(self) -> str:
        command = installation(self.version).command(
            "doveconf", "-c", str(self.etc_dovecot / "dovecot.conf"), "-n"
        )
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout


def test_user_patches_waits_for_a_certificate_then_configures(test_pki, dovecot_version):
    root = make_root("dovenotify-dms-")
    try:
        container = Container(root, dovecot_version)
        # A fresh container without a certificate: nothing changes, the mail server runs.
        assert "stays off until you add the certificate" in container.user_patches()
        assert not container.snippet_path.exists()
        assert not list(container.supervisor.iterdir())

        (container.dms_config / "dovenotify").mkdir()
        shutil.copy(test_pki.client.combined_pem, container.dms_config / "dovenotify" / "push.pem")
        container.user_patches()
        config = yaml.safe_load((container.etc_dovenotify / "dovenotify.yaml").read_text())
        assert config["database"] == f"{root}/state/registrations.sqlite"
        assert config["apns"] == {"certificate": "push.pem"}
        assert (container.etc_dovenotify / "push.pem").stat().st_mode & 0o777 == 0o640
        assert (container.supervisor / "dovenotify.conf").read_text() == PROGRAM.read_text()
        # Debian's whole configuration tree, with the snippet in conf.d, parses.
        parsed = container.doveconf()
        assert "push_notification_lua" in parsed
        assert f"--socket {root}/run/relay.sock" in parsed
        assert f"{root}/run/events.sock" in parsed
        # Run again at the next container start: same result, no duplicates.
        before = container.snippet_path.read_text()
        container.user_patches()
        assert container.snippet_path.read_text() == before
        container.doveconf()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_user_patches_configuration_pushes_in_the_harness(
    test_pki, apns_standin, dovecot_version
):
    root = make_root("dovenotify-dms-")
    try:
        container = Container(root, dovecot_version)
        # The admin's own dovenotify.yaml beside the certificate, pointed at the stand-in.
        settings = service_settings(root, test_pki, apns_standin.url, dovecot_version)
        settings["apns"]["certificate"] = str(container.etc_dovenotify / "push.pem")
        settings["dovecot_files"] = str(root / "dovecot-files")
        (container.dms_config / "dovenotify").mkdir()
        shutil.copy(test_pki.client.combined_pem, container.dms_config / "dovenotify" / "push.pem")
        write_config(container.dms_config / "dovenotify" / "dovenotify.yaml", settings)
        await trio.to_thread.run_sync(container.user_patches)
        await trio.to_thread.run_sync(container.doveconf)

        installed = yaml.safe_load((container.etc_dovenotify / "dovenotify.yaml").read_text())
        (root / "dovecot").mkdir(mode=0o755)
        dovecot = await trio.to_thread.run_sync(
            lambda: start_dovecot(
                root / "dovecot",
                version=dovecot_version,
                extra_conf=container.snippet_path.read_text(),
            )
        )
        try:
            async with run_service(root / "service", installed):
                phone = await ImapClient.connect(
                    dovecot.host, dovecot.imaps_port, ssl_context=dovecot.client_ssl_context()
                )
                assert (await phone.login("alice", "secret")).ok
                assert (await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])).ok
                await trio.to_thread.run_sync(
                    deliver, dovecot, "alice", b"Subject: hi\r\n\r\nyo\r\n"
                )
                request = await apns_standin.next_request()
                assert request.path == f"/3/device/{TOKEN}"
                await phone.logout()
        finally:
            await trio.to_thread.run_sync(dovecot.stop)
    finally:
        shutil.rmtree(root, ignore_errors=True)
