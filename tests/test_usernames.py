"""IMAP registrations and LMTP deliveries meet under one user key.

`user_lookup: NAME` replaces the username with userdb field NAME on both paths
(the post-login helper reads it from its environment, the Lua driver from the
userdb); `username_format` then maps every spelling to one key, which is what
`dovenotify devices` lists.
"""

from __future__ import annotations

import json
import socket
import subprocess

import trio

from tests.harness.dovecot import deliver
from tests.harness.service import dovenotify_command
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
MESSAGE = b"Subject: hello\r\n\r\nhi\r\n"


def token(n: int) -> str:
    return f"{n:02x}" * 32


async def register(stack: Stack, user: str, n: int) -> None:
    phone = await stack.iphone(user)
    assert (await phone.xapplepushservice(ACCOUNT, token(n), ["INBOX"])).ok
    await phone.logout()


def devices(stack: Stack, *args: str) -> list[dict]:
    config = str(stack.service.config_path)
    listed = subprocess.run(
        [*dovenotify_command(), "devices", "--config", config, "--json", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(listed.stdout)


async def test_user_lookup_gives_both_paths_the_same_key(test_pki, dovecot_version):
    fields = {"alice": {"push_user": "Alice@Example.ORG"}}
    async with run_stack(
        test_pki, {"user_lookup": "push_user"}, version=dovecot_version, userdb_fields=fields
    ) as stack:
        await register(stack, "alice", 1)
        await register(stack, "bob", 2)  # no such field: the login name
        assert sorted(d["username"] for d in devices(stack)) == ["alice@example.org", "bob"]
        # The admin may type any spelling of the key.
        assert [d["device_token"] for d in devices(stack, "--user", "ALICE@example.org")] == [
            token(1)
        ]
        for user, n in (("alice", 1), ("bob", 2)):
            await trio.to_thread.run_sync(deliver, stack.dovecot, user, MESSAGE)
            request = await stack.standin.next_request()
            assert request.path.endswith(token(n))


async def test_localpart_maps_logins_and_addresses_together(test_pki, dovecot_version):
    async with run_stack(test_pki, {"username_format": "localpart"}, version=dovecot_version) as s:
        await register(s, "alice", 1)
        assert [d["username"] for d in devices(s)] == ["alice"]
        # What the Lua driver sends when LMTP names the user by full address.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(s.settings["event_socket"])
            sock.sendall(b"MessageNew\tAlice@Example.org\tINBOX\tlmtp\n")
        request = await s.standin.next_request()
        assert request.path.endswith(token(1))
