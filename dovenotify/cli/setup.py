"""`dovenotify setup`: from an installed package to a running, checked installation.

Each step looks at what is there and changes only what differs, saying what it
changed, so running it again changes nothing and says so. It ends with `doctor`.
The service manager is the one running (systemd), else supervisord if installed;
without either it says how to start the service.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import yaml

from dovenotify.apns import certificates
from dovenotify.cli.doctor import check
from dovenotify.cli.registry import add_command
from dovenotify.core import config as configuration
from dovenotify.core import directories
from dovenotify.dovecot import config as dovecot_config
from dovenotify.dovecot.files import dovecot_snippet, install_dovecot_files

SERVICE_USER = "dovenotify"
UNITS = Path(__file__).parent.parent / "units"
SYSTEMD_DIR = Path("/etc/systemd/system")
SUPERVISOR_DIR = Path("/etc/supervisor/conf.d")
# /run is emptied at boot; where systemd exists (also under supervisord) it makes
# the run directory again from this.
TMPFILES = Path("/etc/tmpfiles.d/dovenotify.conf")
DOVECOT_SNIPPET = Path("/etc/dovecot/conf.d/95-dovenotify.conf")
# How long the service may take to open its sockets before doctor runs anyway.
START_TIMEOUT = 20.0


class SetupError(Exception):
    """A step cannot be done; the message says which and why."""


def register(commands: Any) -> None:

    sub = add_command(
        commands,
        "setup",
        "Install and start dovenotify: user, directories, configuration, certificate,"
        " Dovecot's snippet, the systemd unit or supervisord program; then run doctor.",
        _run_setup,
    )
    sub.add_argument("--certificate", type=Path, help="your APNs certificate (PEM or .p12)")
    sub.add_argument("--key", type=Path, help="its key, when it is in a file of its own")
    sub.add_argument(
        "--service-manager",
        choices=("auto", "systemd", "supervisord", "none"),
        default="auto",
        help="what runs the service (default: systemd if it runs, else supervisord)",
    )
    sub.add_argument(
        "--dovecot-version",
        choices=dovecot_config.VERSIONS,
        help="syntax of Dovecot's snippet (default: ask the installed `dovecot --version`)",
    )
    sub.add_argument(
        "--mail-user", help="passed to doctor: the user mail is accessed as (system users)"
    )


@attrs.define
class Report:
    """What setup changed, printed as it goes."""

    changed: list[str] = attrs.field(factory=list)

    def did(self, text: str) -> None:
        self.changed.append(text)
        print(f"setup: {text}", flush=True)


def _run_setup(args: argparse.Namespace) -> int:
    try:
        return _setup(args)
    except SetupError as e:
        print(f"dovenotify setup: {e}", file=sys.stderr)
        return 1


def _setup(args: argparse.Namespace) -> int:

    if os.geteuid() != 0:
        raise SetupError("setup needs root: it creates a user and writes to /etc")
    report = Report()
    service_user(report)
    user = pwd.getpwnam(SERVICE_USER)
    config_path: Path = args.config
    write_config(config_path, args.certificate, args.key, user, report)
    config = configuration.load(config_path)
    install_certificate(config, args.certificate, args.key, user, report)
    service_changed = bool(report.changed)
    make_directories(config, user, report)
    for changed in install_dovecot_files(config.dovecot_files):
        report.did(f"installed {changed} for Dovecot")
    version = args.dovecot_version or dovecot_config.installed_dovecot_version()
    if write_file(DOVECOT_SNIPPET, dovecot_snippet(config, version), 0o644, report):
        reload_dovecot(report)
    manager = _manager(args.service_manager)
    start_service(manager, config_path, service_changed, report)
    if not report.changed:
        print("setup: nothing to change: dovenotify was already set up this way")
    print("setup: checking the installation (dovenotify doctor):", flush=True)
    return check(config_path, mail_user=args.mail_user)


def service_user(report: Report) -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
        return
    except KeyError:
        pass
    if shutil.which("adduser"):
        command = ["adduser", "--system", "--group", "--no-create-home"]
        command += ["--home", "/nonexistent", SERVICE_USER]
    else:
        command = ["useradd", "--system", "--user-group", "--no-create-home"]
        command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SERVICE_USER]
    run(command)
    report.did(f"created the system user {SERVICE_USER}")


def write_config(
    path: Path,
    certificate: Path | None,
    key: Path | None,
    user: pwd.struct_passwd,
    report: Report,
) -> None:
    """The configuration file, if there is none: defaults, certificate under /etc/dovenotify."""
    ensure_directory(path.parent, 0, user.pw_gid, 0o750, report)
    if path.exists():
        return
    if certificate is None:
        raise SetupError(
            f"there is no {path} yet: give your APNs certificate with --certificate FILE"
            " (and --key FILE when the key is in a file of its own)"
        )
    apns: dict[str, str] = {"certificate": str(path.parent / "push.pem")}
    if key is not None:
        apns["key"] = str(path.parent / "push.key")
    text = (
        "# Written by `dovenotify setup`; every key and its default is in the README\n"
        "# (Configuration). Reload the service after a change.\n"
        + yaml.safe_dump({"apns": apns}, default_flow_style=False)
    )
    write_file(path, text, 0o640, report, gid=user.pw_gid)


def install_certificate(
    config: configuration.Config,
    certificate: Path | None,
    key: Path | None,
    user: pwd.struct_passwd,
    report: Report,
) -> None:
    """The certificate given, where the configuration says: root's, readable by the service
    (as the files `cert import` writes in /etc/dovenotify)."""
    target, target_key = config.apns.certificate, config.apns.key
    if certificate is None or target is None:
        return
    try:
        given = certificates.load_credentials(certificate, key)
    except certificates.CertificateError as e:
        raise SetupError(str(e)) from None
    if not _same_credentials(given, target, target_key):
        certificates.save_credentials(given, target, target_key)
        report.did(f"installed the certificate for {given.topic} in {target}")
    for path in (target, target_key):
        if path is not None:
            ensure_owner(path, 0, user.pw_gid, 0o640, report)


def _same_credentials(given: certificates.Credentials, certificate: Path, key: Path | None) -> bool:
    try:
        installed = certificates.load_credentials(certificate, key)
    except certificates.CertificateError:
        return False
    return installed.certificate == given.certificate and _key_der(installed) == _key_der(given)


def _key_der(credentials: certificates.Credentials) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return credentials.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_directories(config: configuration.Config, user: pwd.struct_passwd, report: Report) -> None:
    for path in directories.needed(config):
        ensure_directory(path, user.pw_uid, user.pw_gid, directories.RUN_MODE, report)


def ensure_directory(path: Path, uid: int, gid: int, mode: int, report: Report) -> None:
    if not path.is_dir():
        path.mkdir(parents=True)
        report.did(f"created {path}")
    ensure_owner(path, uid, gid, mode, report)


def ensure_owner(path: Path, uid: int, gid: int, mode: int, report: Report) -> None:
    st = path.stat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid)
        report.did(f"made {path} owned by {directories.owner_names(uid, gid)}")
    if st.st_mode & 0o7777 != mode:
        path.chmod(mode)
        report.did(f"set the mode of {path} to {mode:04o}")


def write_file(path: Path, text: str, mode: int, report: Report, *, gid: int = 0) -> bool:
    """Write `text` to `path` unless it holds that already; True if it changed."""
    if path.is_file() and path.read_text() == text:
        ensure_owner(path, 0, gid, mode, report)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_text(text)
    os.chown(temporary, 0, gid)
    temporary.chmod(mode)
    os.replace(temporary, path)
    report.did(f"wrote {path}")
    return True


def reload_dovecot(report: Report) -> None:
    check = run(["doveconf", "-n"], check=False)
    if check.returncode != 0:
        raise SetupError(
            f"Dovecot does not accept its configuration with {DOVECOT_SNIPPET}:"
            f" {check.stderr.strip()}"
        )
    if run(["doveadm", "reload"], check=False).returncode == 0:
        report.did("reloaded Dovecot")
    else:
        print("setup: Dovecot is not running: it loads the snippet when it starts")


def _manager(choice: str) -> str:
    if choice != "auto":
        return choice
    if Path("/run/systemd/system").is_dir():
        return "systemd"
    if shutil.which("supervisorctl") and SUPERVISOR_DIR.is_dir():
        return "supervisord"
    return "none"


def start_service(manager: str, config_path: Path, changed: bool, report: Report) -> None:
    """Install the unit or program, and (re)start the service if anything it reads changed."""
    if manager == "systemd":
        unit = (UNITS / "systemd" / "dovenotify.service").read_text()
        if write_file(SYSTEMD_DIR / "dovenotify.service", unit, 0o644, report):
            run(["systemctl", "daemon-reload"])
            changed = True
        if run(["systemctl", "is-active", "--quiet", "dovenotify"], check=False).returncode:
            run(["systemctl", "enable", "--now", "dovenotify"])
            report.did("started dovenotify (systemctl enable --now dovenotify)")
        elif changed:
            run(["systemctl", "restart", "dovenotify"])
            report.did("restarted dovenotify")
    elif manager == "supervisord":
        program = (UNITS / "supervisord" / "dovenotify.conf").read_text()
        if shutil.which("systemd-tmpfiles"):
            tmpfiles = f"d /run/dovenotify 0755 {SERVICE_USER} {SERVICE_USER} -\n"
            write_file(TMPFILES, tmpfiles, 0o644, report)
        if write_file(SUPERVISOR_DIR / "dovenotify.conf", program, 0o644, report):
            # Adds the program (autostart) or restarts it with the new definition.
            run(["supervisorctl", "update"])
            report.did("started dovenotify (supervisorctl update)")
        elif changed:
            run(["supervisorctl", "restart", "dovenotify"])
            report.did("restarted dovenotify")
        elif not _supervised_up(run(["supervisorctl", "status", "dovenotify"], check=False).stdout):
            run(["supervisorctl", "start", "dovenotify"])
            report.did("started dovenotify")
    else:
        print(
            "setup: no systemd or supervisord here: run"
            f" `dovenotify serve --config {config_path}` as {SERVICE_USER}"
        )
        return
    _wait_for_socket(config_path)


def _supervised_up(status: str) -> bool:
    # STARTING too: supervisord calls a program RUNNING only after `startsecs`
    # (2 s here), and starting it again then is an error, not a no-op.
    return any(state in status.split() for state in ("RUNNING", "STARTING"))


def _wait_for_socket(config_path: Path) -> None:
    """Give the service time to listen, so that doctor sees it running."""
    socket = configuration.load(config_path).event_socket
    deadline = time.monotonic() + START_TIMEOUT
    while not socket.is_socket() and time.monotonic() < deadline:
        time.sleep(0.2)


def run(command: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(command), capture_output=True, text=True)
    except FileNotFoundError:
        raise SetupError(f"`{command[0]}` is not installed") from None
    if check and result.returncode != 0:
        raise SetupError(
            f"`{' '.join(command)}` failed (exit {result.returncode}):"
            f" {(result.stderr or result.stdout).strip()}"
        )
    return result
