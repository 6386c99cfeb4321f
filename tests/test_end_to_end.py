"""The whole path on real parts: an iPhone registers, a mail arrives, APNs is told."""

import json
import subprocess
import time

from tests.harness.dovecot import deliver
from tests.harness.service import dovenotify_command
from tests.harness.stack import run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TOKEN = "2918390218931890821908309283098109381029309829018310983092892829"


async def test_register_deliver_push(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        phone = await stack.iphone("alice")
        assert "XAPPLEPUSHSERVICE" in await phone.capability()
        reply = await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
        topic = test_pki.client.topic
        assert [*reply.untagged, reply.tagged] == [
            b'* XAPPLEPUSHSERVICE "mailbox" "INBOX"',
            b'* XAPPLEPUSHSERVICE aps-version "2" aps-topic "' + topic.encode() + b'"',
            reply.tag.encode() + b" OK XAPPLEPUSHSERVICE completed.",
        ]
        # The session goes on through the relay as before.
        assert (await phone.command("NOOP")).ok

        listed = subprocess.run(
            [
                *dovenotify_command(),
                "devices",
                "--config",
                str(stack.service.config_path),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        (device,) = json.loads(listed.stdout)
        assert device["username"] == "alice"
        assert device["account_id"] == ACCOUNT
        assert device["device_token"] == TOKEN
        assert device["topic"] == topic
        assert device["mailboxes"] == ["INBOX"]

        before = time.time()
        deliver(stack.dovecot, "alice", b"Subject: hello\r\n\r\nhi\r\n")
        request = await stack.standin.next_request()
        assert request.method == "POST"
        assert request.http_version == "2"
        assert request.path == f"/3/device/{TOKEN}"
        assert request.headers["apns-topic"] == topic
        assert request.headers["apns-push-type"] == "background"
        assert "apns-priority" not in request.headers
        expiration = int(request.headers["apns-expiration"])
        assert before + 86400 - 2 <= expiration <= time.time() + 86400 + 2
        assert request.body == b'{"aps":{"account-id":"%s"}}' % ACCOUNT.encode()
        # The stand-in saw our Apple-shaped client certificate in the handshake.
        assert stack.standin.peer_certificates
        await phone.logout()
