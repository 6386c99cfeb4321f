"""Run the installed `dovenotify serve` (or `dovenotify relay`) as a real subprocess,
ready when it says so.

Readiness is the systemd notify protocol: the service sends READY=1 to the
datagram socket named by NOTIFY_SOCKET, and the harness awaits that datagram
instead of polling for sockets.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio
import yaml

from tests.harness.certs import Pki
from tests.harness.dovecot import make_root

STARTUP_TIMEOUT = 15.0
SYSTEM_PYTHON = "/usr/bin/python3"
STOP_TIMEOUT = 15.0


def dovenotify_command() -> list[str]:
    """The `dovenotify` entry point installed next to this Python, as an admin runs it."""
    installed = shutil.which("dovenotify", path=str(Path(sys.executable).parent))
    return [installed] if installed else [sys.executable, "-m", "dovenotify"]


@attrs.define
class RunningService:
    process: trio.Process
    config_path: Path
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, text: str, timeout: float = 5.0) -> None:
        """Until the service's log contains `text` (it is written as things happen)."""
        with trio.fail_after(timeout):
            while text not in self.log_text():
                await trio.sleep(0.01)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
            with trio.move_on_after(STOP_TIMEOUT):
                await self.process.wait()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(f"dovenotify ignored signal {signum}:\n{self.log_text()}")
        return self.process.returncode


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(settings), sort_keys=False))
    return path


@asynccontextmanager
async def run_service(
    directory: Path,
    settings: Mapping[str, Any],
    extra_args: tuple[str, ...] = (),
    command: str = "serve",
    user: str | None = None,
) -> AsyncIterator[RunningService]:
    """Start `dovenotify serve` (or `command`, e.g. relay) with these settings; stop it
    (by its PID) on exit. Processes sharing `directory` share its configuration file.
    `user`: run it as that user, with that user's primary group only, as systemd's
    User= does; `directory` must let the user in."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_config(directory / "dovenotify.yaml", settings)
    serve = command == "serve"
    log_path = directory / ("dovenotify.log" if serve else f"{command}.log")
    notify_path = directory / ("notify.sock" if serve else f"{command}-notify.sock")
    notify_path.unlink(missing_ok=True)
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        await notify.bind(str(notify_path))
        as_user: dict[str, Any] = {}
        env = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}
        program = dovenotify_command()
        if user is not None:
            notify_path.chmod(0o666)
            as_user = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
            program, env = _runnable_by_others(program, env)
        with log_path.open("ab") as log:
            process = await trio.lowlevel.open_process(
                [*program, command, "--config", str(config_path), *extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                **as_user,
            )
        service = RunningService(process, config_path, log_path)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_exited_early, service, nursery.cancel_scope)
                with trio.fail_after(STARTUP_TIMEOUT):
                    message = await notify.recv(64)
                nursery.cancel_scope.cancel()
            if message != b"READY=1":
                raise AssertionError(f"unexpected notify message {message!r}")
        except BaseException:
            await service.stop(signal.SIGKILL)
            raise
    try:
        yield service
    finally:
        await service.stop()


def _runnable_by_others(
    program: list[str], env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The installed package run by a Python any user may execute.

    A Python installed under a private home (pyenv in /root) cannot be run by a
    service user; the system's Python of the same version runs the installed
    package from this environment's site-packages instead, as a service user would
    run it from a system-wide install.
    """
    system = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=False,
    )
    if system.stdout.strip() != str(sys.version_info[:2]):
        return program, env
    site_packages = sysconfig.get_paths()["purelib"]
    return [SYSTEM_PYTHON, "-m", "dovenotify"], {**env, "PYTHONPATH": site_packages}


async def _exited_early(service: RunningService, scope: trio.CancelScope) -> None:
    await service.process.wait()
    raise AssertionError(
        f"dovenotify exited with {service.process.returncode} before it was ready:\n"
        + service.log_text()
    )


# --- the service as its own user ------------------------------------------------------

SERVICE_USER = "nobody"


def service_layout(
    test_pki: Pki, standin_url: str, certificate: Path | None = None, user: str = SERVICE_USER
) -> tuple[Path, dict[str, Any]]:
    """Directories as the install sets them up for a service user: the certificate's
    root:<service group> 0750, the state directory the service user's own. A
    `certificate` given is installed root:<service group> 0640."""
    entry = pwd.getpwnam(user)
    root = make_root("dovenotify-files-")
    etc, state = root / "etc", root / "state"
    etc.mkdir(mode=0o750)
    os.chown(etc, 0, entry.pw_gid)
    state.mkdir(mode=0o750)
    os.chown(state, entry.pw_uid, entry.pw_gid)
    shutil.copyfile(test_pki.ca_file, etc / "ca.pem")
    os.chown(etc / "ca.pem", 0, entry.pw_gid)
    if certificate is not None:
        shutil.copyfile(certificate, etc / "push.pem")
        os.chown(etc / "push.pem", 0, entry.pw_gid)
        (etc / "push.pem").chmod(0o640)
    settings = {
        "database": str(state / "registrations.sqlite"),
        "event_socket": str(state / "events.sock"),
        "relay_socket": str(state / "relay.sock"),
        "event_spool": str(state / "events.spool"),
        "apns": {
            "certificate": str(etc / "push.pem"),
            "endpoint": standin_url,
            "ca_file": str(etc / "ca.pem"),
        },
    }
    return root, settings


def owner(path: Path) -> tuple[str, str, int]:
    st = path.stat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777
