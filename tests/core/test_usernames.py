"""IMAP registrations and LMTP deliveries meet under one user key.

`user_lookup: NAME` replaces the username with userdb field NAME on both paths
(the post-login helper reads it from its environment, the Lua driver from the
userdb); `username_format` then maps every spelling to one key, which is what
`dovenotify devices` lists.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest
import trio

from tests.harness.dovecot import DEFAULT_USERS, deliver
from tests.harness.imap_client import ImapClient
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


# One mailbox, two names: the iPhone logs in as `alice`, mail arrives over LMTP
# for `Alice@Example.org`. Both names are in the passwd-file (the address's home
# is alice's), and auth_username_format keeps the case (Dovecot's default, %Lu on
# 2.3 and %{user|lower} on 2.4, would lower-case the address before dovenotify
# sees it), so LMTP reports the user as `Alice@Example.org`.
ADDRESS = "Alice@Example.org"
KEEP_CASE = {"2.3": "auth_username_format = %u\n", "2.4": "auth_username_format = %{user}\n"}


async def inbox_messages(client: ImapClient) -> int:
    reply = await client.command("STATUS INBOX (MESSAGES)")
    [line] = reply.untagged_starting(b"STATUS")
    return int(re.search(rb"MESSAGES (\d+)", line)[1])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"username_format": "localpart"}, "alice"),
        ({"username_format": "full", "default_domain": "Example.org"}, "alice@example.org"),
    ],
)
async def test_login_name_and_recipient_address_meet_through_dovecot(
    test_pki, dovecot_version, overrides, key
):
    async with run_stack(
        test_pki,
        overrides,
        version=dovecot_version,
        dovecot_conf=KEEP_CASE[dovecot_version],
        users={**DEFAULT_USERS, ADDRESS: "secret"},
    ) as stack:
        phone = await stack.iphone("alice")
        # Creates alice's home, which the address's home then links to.
        assert await inbox_messages(phone) == 0
        (stack.dovecot.layout.homes / ADDRESS).symlink_to("alice")
        assert (await phone.xapplepushservice(ACCOUNT, token(1), ["INBOX"])).ok
        assert [d["username"] for d in devices(stack)] == [key]
        await trio.to_thread.run_sync(deliver, stack.dovecot, ADDRESS, MESSAGE)
        # LMTP named the user by the address, case kept.
        await trio.to_thread.run_sync(stack.dovecot.wait_for_log, rf"lmtp\({re.escape(ADDRESS)}\)")
        request = await stack.standin.next_request()
        assert request.path.endswith(token(1))
        # The push leads the phone to the message: one mailbox under both names.
        assert await inbox_messages(phone) == 1
        await phone.logout()


async def test_without_username_format_login_and_address_stay_apart(test_pki, dovecot_version):
    """The control for the test above: lower-casing alone keeps `alice` and
    `alice@example.org` apart, so the delivery to the address pushes nobody."""
    async with run_stack(
        test_pki,
        {"username_format": "lowercase"},
        version=dovecot_version,
        dovecot_conf=KEEP_CASE[dovecot_version],
        users={**DEFAULT_USERS, ADDRESS: "secret"},
    ) as stack:
        await register(stack, "alice", 1)
        await register(stack, "bob", 2)
        await trio.to_thread.run_sync(deliver, stack.dovecot, ADDRESS, MESSAGE)
        # Delivered later: once bob's push is out, alice's would have gone before it.
        await trio.to_thread.run_sync(deliver, stack.dovecot, "bob", MESSAGE)
        request = await stack.standin.next_request()
        assert request.path.endswith(token(2))
        assert sorted(d["username"] for d in devices(stack)) == ["alice", "bob"]
