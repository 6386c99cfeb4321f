"""The rendered Dovecot snippet: Dovecot accepts it, and the shipped examples are it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

import dovenotify
from dovenotify.dovecot import config as dovecot_config
from dovenotify.dovecot.config import installed_dovecot_version, render, render_example
from dovenotify.dovecot.files import DOVECOT_FILES
from tests.harness.dovecot import installation, make_root, write_config
from tests.harness.imap_client import ImapClient

REPO = Path(__file__).resolve().parents[2]
HAVE_DOVECOT = shutil.which("doveconf") is not None

ARGS = {
    "lua_script": Path("/opt/dn/dovenotify.lua"),
    "event_socket": Path("/run/dn/events.sock"),
    "event_timeout": 0.25,
    "helper_command": ["/usr/bin/python3", "-I", "/opt/dn/postlogin.py"],
    "relay_socket": Path("/run/dn/relay.sock"),
    "relay_timeout": 1.5,
}


@pytest.mark.parametrize("version", dovecot_config.VERSIONS)
def test_example_files_are_what_render_produces(version: str):
    example = REPO / "dovecot-conf" / version / "95-dovenotify.conf"
    assert example.read_text() == render_example(version), (
        f"regenerate {example} from dovenotify.dovecot_config.render_example({version!r})"
    )


@pytest.mark.parametrize("name", [n for n in DOVECOT_FILES if n.endswith(".lua")])
def test_example_lua_script_is_the_package_script(name: str):
    link = REPO / "dovecot-conf" / name
    assert link.is_symlink()
    assert link.resolve() == (Path(dovenotify.__file__).parent / "dovecot" / name)


@pytest.mark.parametrize("version", dovecot_config.VERSIONS)
def test_render_contains_the_settings(version: str):
    text = render(version, **ARGS, user_field="push_user")
    assert text.count("{") == text.count("}")
    assert "/opt/dn/dovenotify.lua" in text
    assert "dovenotify_socket = /run/dn/events.sock" in text
    assert "dovenotify_timeout = 0.25" in text
    assert "dovenotify_user_field = push_user" in text
    assert (
        "executable = script-login /usr/bin/python3 -I /opt/dn/postlogin.py"
        " --socket /run/dn/relay.sock --timeout 1.5 --user-field push_user\n"
    ) in text
    assert "executable = imap imap-postlogin\n" in text
    internal_user = "$default_internal_user" if version == "2.3" else "$SET:default_internal_user"
    assert f"  user = {internal_user}\n" in text


def test_render_without_user_field_has_none():
    for version in dovecot_config.VERSIONS:
        text = render(version, **ARGS)
        assert "user_field" not in text and "--user-field" not in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lua_script": Path("/opt/my scripts/dn.lua")}, "Lua script path"),
        ({"event_socket": Path("/run/%u.sock")}, "event socket path"),
        ({"helper_command": ["/usr/bin/python3", "-c", "x y"]}, "helper argument"),
        ({"helper_command": []}, "helper command is empty"),
        ({"event_timeout": 0}, "event timeout"),
        ({"user_field": "push user"}, "user field"),
    ],
)
def test_render_refuses_what_dovecot_would_misread(change: dict, message: str):
    with pytest.raises(ValueError, match=message):
        render("2.3", **{**ARGS, **change})


def test_render_refuses_unknown_versions():
    with pytest.raises(ValueError, match="unsupported Dovecot version"):
        render("2.2", **ARGS)


@pytest.fixture
def root() -> Iterator[Path]:
    root = make_root("dovenotify-conf-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def doveconf(version: str, conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        installation(version).command("doveconf", "-c", str(conf), *args),
        capture_output=True,
        text=True,
        timeout=30,
    )


def enabled(setting: str) -> list[str]:
    """The names a list setting holds: 2.3 prints "a b", 2.4 "a = yes" lines."""
    if " = " in setting:
        return re.findall(r"^(\S+) = yes$", setting, re.MULTILINE)
    return setting.split()


@pytest.mark.skipif(not HAVE_DOVECOT or os.geteuid() != 0, reason="needs Dovecot and root")
@pytest.mark.parametrize("user_field", [None, "push_user"])
def test_doveconf_accepts_base_config_with_snippet(
    root: Path, dovecot_version: str, user_field: str | None
):
    version = dovecot_version
    conf = write_config(
        root, version=version, extra_conf=render(version, **ARGS, user_field=user_field)
    )
    result = doveconf(version, conf, "-n")
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "Error" not in result.stderr, result.stderr
    for protocol in ("imap", "lmtp", "lda"):
        plugins = doveconf(version, conf, "-h", "-f", f"protocol={protocol}", "mail_plugins")
        assert enabled(plugins.stdout) == list(dovecot_config.PLUGINS), plugins
    capability = doveconf(version, conf, "-h", "-f", "protocol=imap", "imap_capability")
    capabilities = [name.lstrip("+") for name in enabled(capability.stdout)]
    # The relay advertises it, in the sessions where it answers it.
    assert "XAPPLEPUSHSERVICE" not in capabilities, capability


def fake_dovecot(directory: Path, output: str, status: int = 0) -> str:
    path = directory / "dovecot"
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("output", "expected"),
    [("2.3.19.1 (9b53102964)", "2.3"), ("2.4.1-4 (7d8c0e5759)", "2.4")],
)
def test_installed_dovecot_version(tmp_path: Path, output: str, expected: str):
    assert installed_dovecot_version(fake_dovecot(tmp_path, output)) == expected


@pytest.mark.parametrize(
    ("output", "status", "message"),
    [
        ("2.2.36 (1f10bfa63)", 0, "Dovecot 2.2.36 is not supported"),
        ("2.5.0 (0000000000)", 0, "Dovecot 2.5.0 is not supported"),
        ("garbage", 0, "cannot read the Dovecot version"),
        ("2.3.19.1", 1, "cannot read the Dovecot version"),
    ],
)
def test_installed_dovecot_version_errors(tmp_path: Path, output: str, status: int, message: str):
    with pytest.raises(ValueError, match=message):
        installed_dovecot_version(fake_dovecot(tmp_path, output, status))


def test_installed_dovecot_version_without_dovecot(tmp_path: Path):
    with pytest.raises(ValueError, match="is Dovecot installed"):
        installed_dovecot_version(str(tmp_path / "no-such-dovecot"))


# --- the snippet in a running Dovecot, through the simulated iPhone -----------

PASS_THROUGH_HELPER = """\
#!/bin/sh
while [ "$#" -gt 0 ]; do
  case "$1" in --socket|--timeout|--user-field) shift 2 ;; *) break ;; esac
done
echo "pass-through helper for $USER" >&2
exec "$@"
"""


@pytest.mark.skipif(not HAVE_DOVECOT or os.geteuid() != 0, reason="needs Dovecot and root")
async def test_tls_login_through_the_post_login_service_without_the_relay_offers_no_push(
    dovecot_factory, dovecot_version: str, root: Path
):
    helper = root / "pass-through.sh"
    helper.write_text(PASS_THROUGH_HELPER)
    helper.chmod(0o755)
    # 2.4 refuses to start unless lua_file exists.
    script = shutil.copy(Path(dovenotify.__file__).parent / "dovecot" / "dovenotify.lua", root)
    snippet = render(
        dovecot_version,
        **{**ARGS, "helper_command": [str(helper)], "lua_script": Path(script)},
    )
    d = dovecot_factory(extra_conf=snippet)
    client = await ImapClient.connect(d.host, d.imaps_port, ssl_context=d.client_ssl_context())
    await client.login("alice", "secret")
    capabilities = await client.capability()
    # Nobody here would answer XAPPLEPUSHSERVICE, so nobody offers it.
    assert "XAPPLEPUSHSERVICE" not in capabilities
    if dovecot_version == "2.4":
        # Dovecot's default offer stands: the relay steps out of compressed sessions.
        assert "COMPRESS=DEFLATE" in capabilities
    await client.logout()
    # The session really went through script-login and the helper.
    d.wait_for_log(r"pass-through helper for alice")


async def test_simulated_iphone_sends_the_ios_form():
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> bytes:
        await server_stream.send_all(b"* OK ready\r\n")
        received = b""
        while not received.endswith(b"\r\n"):
            received += await server_stream.receive_some()
        tag = received.split(b" ", 1)[0]
        await server_stream.send_all(
            b'* XAPPLEPUSHSERVICE aps-version "2" aps-topic "com.apple.mail.XServer.x"\r\n'
            + tag
            + b" OK XAPPLEPUSHSERVICE completed.\r\n"
        )
        return received

    async with trio.open_nursery() as nursery:
        received: list[bytes] = []

        async def run_server() -> None:
            received.append(await server())

        nursery.start_soon(run_server)
        client = ImapClient(client_stream)
        client.greeting = await client.read_response()
        reply = await client.xapplepushservice(
            "0715A26B-CA09-4730-A419-793000CA982E", "29" * 32, ["INBOX", "Notes"]
        )
    assert received[0] == (
        b'A1 XAPPLEPUSHSERVICE "aps-version" "2"'
        b' "aps-account-id" "0715A26B-CA09-4730-A419-793000CA982E"'
        b' "aps-device-token" "' + b"29" * 32 + b'"'
        b' "aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Notes")\r\n'
    )
    assert reply.ok
    assert reply.untagged_starting(b"XAPPLEPUSHSERVICE") == [
        b'* XAPPLEPUSHSERVICE aps-version "2" aps-topic "com.apple.mail.XServer.x"'
    ]
