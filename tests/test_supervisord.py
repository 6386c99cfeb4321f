"""The shipped supervisord program sections run dovenotify: stopping it drains pushes,
and with relay_process: separate it restarts under the relay's sessions."""

import re
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dovenotify.store import Registration, SQLiteStore
from tests.harness.handoff import hand_over, relays
from tests.harness.service import dovenotify_command, write_config
from tests.harness.stack import service_settings

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "dovecot-conf" / "supervisord" / "dovenotify.conf"
RELAY_PROGRAM = REPO / "dovecot-conf" / "supervisord" / "dovenotify-relay.conf"
TOKEN = "ab" * 32

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "supervisord"], capture_output=True).returncode != 0,
    reason="supervisord is not installed (scripts/test installs Debian's supervisor)",
)


def program_section(
    config_path: Path, log_path: Path, program: Path = PROGRAM, command: str = "serve"
) -> str:
    """A shipped section, pointed at this test's command, config and log."""
    text = program.read_text()
    assert f"dovenotify {command} --config" in text
    command = " ".join([*dovenotify_command(), command, "--config", str(config_path)])
    text, found = re.subn(r"(?m)^command=.*$", f"command={command}", text)
    assert found == 1
    # Tests run as root; the shipped file names the dedicated dovenotify user.
    text = re.sub(r"(?m)^user=.*$", "user=root", text)
    # Started by `supervisorctl start` below, as docker-mailserver's user-patches.sh does.
    text = re.sub(r"(?m)^autostart=.*$", "autostart=false", text)
    return re.sub(r"(?m)^stdout_logfile=.*$", f"stdout_logfile={log_path}", text)


async def supervisorctl(conf: Path, *args: str) -> str:
    result = await trio.run_process(
        ["supervisorctl", "-c", str(conf), *args], capture_stdout=True, check=False
    )
    return result.stdout.decode()


class SupervisordLog:
    """supervisord's own log, read from its stdout as it is written."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = ""

    async def wait_for(self, needle: str) -> None:
        with trio.fail_after(10):
            while needle not in self.text:
                chunk = await self.stream.receive_some()
                if not chunk:
                    raise AssertionError(f"supervisord exited; its log:\n{self.text}")
                self.text += chunk.decode(errors="replace")


@asynccontextmanager
async def run_supervisord(
    tmp_path: Path, sections: dict[str, str]
) -> AsyncIterator[tuple[Path, SupervisordLog]]:
    """supervisord with these program sections, none started; yields its config and log."""
    (tmp_path / "conf.d").mkdir()
    for name, text in sections.items():
        (tmp_path / "conf.d" / f"{name}.conf").write_text(text)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={tmp_path}/supervisor.sock\n"
        "[supervisord]\nlogfile=/dev/stdout\nlogfile_maxbytes=0\n"
        f"pidfile={tmp_path}/supervisord.pid\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
        f"[supervisorctl]\nserverurl=unix://{tmp_path}/supervisor.sock\n"
        f"[include]\nfiles={tmp_path}/conf.d/*.conf\n"
    )
    supervisord = await trio.lowlevel.open_process(
        ["supervisord", "-n", "-c", str(conf)], stdout=subprocess.PIPE
    )
    log = SupervisordLog(supervisord.stdout)
    try:
        await log.wait_for("supervisord started")
        yield conf, log
    finally:
        supervisord.terminate()
        with trio.fail_after(10):
            await supervisord.wait()


def register_alice(settings: dict, test_pki) -> None:
    store = SQLiteStore(Path(settings["database"]))
    store.register(Registration("alice", "ACC", TOKEN, test_pki.client.topic, ("INBOX",)))
    store.close()


async def test_supervisord_start_answer_stop_drains(tmp_path, test_pki, apns_standin):
    settings = service_settings(tmp_path, test_pki, apns_standin.url)
    register_alice(settings, test_pki)
    config_path = write_config(tmp_path / "dovenotify.yaml", settings)
    log_path = tmp_path / "dovenotify.log"
    sections = {"dovenotify": program_section(config_path, log_path)}
    async with run_supervisord(tmp_path, sections) as (conf, log):
        assert "dovenotify: started" in await supervisorctl(conf, "start", "dovenotify")
        event_socket = settings["event_socket"]
        # New mail pushes at once: the service answers.
        send_event(event_socket, "MessageNew\talice\tINBOX\tlmtp\n")
        request = await apns_standin.next_request()
        assert request.path == f"/3/device/{TOKEN}"
        # A flag change waits `delay` (30 s) to coalesce; stopping must not lose it.
        send_event(event_socket, "FlagsSet\talice\tINBOX\timap\n")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisorctl, conf, "stop", "dovenotify")
            await apns_standin.next_request()
        assert "STOPPED" in await supervisorctl(conf, "status", "dovenotify")
        assert "stopping on SIGTERM" in log_path.read_text()
        await log.wait_for("stopped: dovenotify (exit status 0)")


async def test_supervisord_restarts_serve_under_the_relays_sessions(
    tmp_path, test_pki, apns_standin
):
    settings = {
        **service_settings(tmp_path, test_pki, apns_standin.url),
        "relay_process": "separate",
    }
    register_alice(settings, test_pki)
    config_path = write_config(tmp_path / "dovenotify.yaml", settings)
    sections = {
        "dovenotify": program_section(config_path, tmp_path / "dovenotify.log"),
        "dovenotify-relay": program_section(
            config_path, tmp_path / "relay.log", RELAY_PROGRAM, "relay"
        ),
    }
    async with run_supervisord(tmp_path, sections) as (conf, log):
        started = await supervisorctl(conf, "start", "dovenotify", "dovenotify-relay")
        assert "dovenotify: started" in started and "dovenotify-relay: started" in started
        relay_pid = await program_pid(conf, "dovenotify-relay")
        session = hand_over(settings["relay_socket"])
        client, server = session
        with client, server:
            assert relays(session)

            restarted = await supervisorctl(conf, "restart", "dovenotify")
            assert "dovenotify: started" in restarted and "relay" not in restarted
            # The relay program was left alone, and so was the session it holds.
            assert await program_pid(conf, "dovenotify-relay") == relay_pid
            assert relays(session)
            send_event(settings["event_socket"], "MessageNew\talice\tINBOX\tlmtp\n")
            assert (await apns_standin.next_request()).path == f"/3/device/{TOKEN}"

            assert "stopped" in await supervisorctl(conf, "stop", "dovenotify-relay")
            await log.wait_for("stopped: dovenotify-relay (exit status 0)")
            # Its sessions end with it, and its socket is gone.
            client.settimeout(5)
            assert client.recv(64) == b""
            assert not Path(settings["relay_socket"]).exists()


async def program_pid(conf: Path, name: str) -> int:
    status = await supervisorctl(conf, "status", name)
    match = re.search(r"RUNNING +pid (\d+)", status)
    assert match, status
    return int(match[1])


def send_event(path: str, line: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(line.encode())
