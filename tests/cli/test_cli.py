"""The `dovenotify` command as an admin meets it: config errors, devices, dovecot-config."""

import json
import subprocess
from pathlib import Path

import pytest

from dovenotify.core import config
from dovenotify.dovecot.files import DOVECOT_FILES
from dovenotify.store.base import Registration
from dovenotify.store.sqlite import SQLiteStore
from tests.harness.service import dovenotify_command

REPO = Path(__file__).resolve().parents[2]


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dovenotify_command(), *args], capture_output=True, text=True, check=check
    )


def test_example_config_is_valid_and_is_the_defaults():
    loaded = config.load(REPO / "dovenotify.example.yaml")
    defaults = config.Config(path=loaded.path)
    assert loaded.apns.certificate == Path("/etc/dovenotify/push.pem")
    assert (loaded.database, loaded.event_socket, loaded.relay_socket) == (
        defaults.database,
        defaults.event_socket,
        defaults.relay_socket,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("database: 5\n", "line 1: database: expected a file path or a postgresql:// URL, got 5"),
        (
            "log_level: info\napns:\n  endpont: https://x\n",
            "line 3: unknown key 'apns.endpont' (did you mean 'apns.endpoint'?)",
        ),
        ("apns:\n  endpoint: http://insecure\n", "line 2: apns.endpoint: expected an https:// URL"),
        ("relay_timeout: yes\n", "relay_timeout: expected a number from 0.05 to 10, got true"),
        ("apns: [1]\n", "line 1: apns: expected a mapping of keys to values"),
        ("a: [\n", "this is not valid YAML"),
    ],
)
def test_config_errors_name_file_key_and_line(tmp_path, text, message):
    path = tmp_path / "dovenotify.yaml"
    path.write_text(text)
    result = run("devices", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"dovenotify: {path}")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path):
    result = run("devices", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "cannot read the configuration file" in result.stderr


def test_serve_with_unreadable_certificate_says_which_file(tmp_path):
    path = tmp_path / "dovenotify.yaml"
    path.write_text(
        f"database: {tmp_path}/db.sqlite\nevent_socket: {tmp_path}/e.sock\n"
        f"relay_socket: {tmp_path}/r.sock\napns:\n  certificate: {tmp_path}/missing.pem\n"
    )
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"{tmp_path}/missing.pem" in result.stderr
    assert "Traceback" not in result.stderr


def test_devices_table_and_json(tmp_path):
    database = tmp_path / "registrations.sqlite"
    store = SQLiteStore(database)
    store.register(Registration("alice", "ACC-1", "ab" * 32, "topic.a", ("INBOX", "Work"), 0))
    store.register(Registration("bob", "ACC-2", "cd" * 32, "topic.a", ("INBOX",), 86400))
    store.close()
    path = tmp_path / "dovenotify.yaml"
    path.write_text(f"database: {database}\n")

    table = run("devices", "--config", str(path), check=True).stdout
    assert table.splitlines()[0].split() == [
        "USER",
        "ACCOUNT",
        "DEVICE",
        "MAILBOXES",
        "REGISTERED",
        "LAST",
        "PUSH",
    ]
    assert "alice" in table and "ACC-1" in table and "INBOX, Work" in table

    alice = json.loads(
        run("devices", "--config", str(path), "--user", "alice", "--json", check=True).stdout
    )
    assert alice == [
        {
            "username": "alice",
            "account_id": "ACC-1",
            "device_token": "ab" * 32,
            "topic": "topic.a",
            "mailboxes": ["INBOX", "Work"],
            "registered_at": "1970-01-01T00:00:00+00:00",
            "last_push_at": None,
            "last_push_result": None,
        }
    ]
    assert run("devices", "--config", str(path), "--user", "carol", check=True).stdout == (
        "No devices registered for carol.\n"
    )


@pytest.mark.parametrize("version", ["2.3", "2.4"])
def test_dovecot_config_install_points_at_installed_files(tmp_path, version):
    files = tmp_path / "files"
    path = tmp_path / "dovenotify.yaml"
    path.write_text(f"dovecot_files: {files}\n")
    result = run(
        "dovecot-config",
        "--config",
        str(path),
        "--dovecot-version",
        version,
        "--install",
        check=True,
    )
    for name in (*DOVECOT_FILES, "dovenotify-driver.luac"):
        assert (files / name).stat().st_mode & 0o777 == 0o644
    assert f"{files}/dovenotify.lua" in result.stdout
    assert f"/usr/bin/python3 -I -S {files}/postlogin.py" in result.stdout
    assert "XAPPLEPUSHSERVICE" in result.stdout


def test_dovecot_config_asks_the_installed_dovecot(tmp_path):
    path = tmp_path / "dovenotify.yaml"
    path.write_text("{}\n")
    version = subprocess.run(
        ["dovecot", "--version"], capture_output=True, text=True, check=True
    ).stdout
    expected = run(
        "dovecot-config",
        "--config",
        str(path),
        "--dovecot-version",
        ".".join(version.split(".")[:2]),
        check=True,
    ).stdout
    assert run("dovecot-config", "--config", str(path), check=True).stdout == expected
