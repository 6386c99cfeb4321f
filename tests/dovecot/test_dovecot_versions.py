"""Each integration test runs on Dovecot 2.3 and 2.4: the harness's base setup works on both."""

import re

from tests.harness.dovecot import Dovecot, deliver
from tests.harness.imap_client import ImapClient


def test_the_dovecot_under_test_is_that_version(dovecot: Dovecot, dovecot_version: str):
    # One is the host's, the other the chroot's: neither may stand in for the other.
    dovecot.wait_for_log(rf"Dovecot v{re.escape(dovecot_version)}\.\d+\S* .*starting up")
    assert dovecot.version == dovecot_version


async def test_lmtp_delivery_to_maildir_read_over_tls(dovecot: Dovecot):
    deliver(dovecot, "alice", b"Subject: both versions\r\n\r\nhello\r\n")
    (stored,) = (dovecot.layout.homes / "alice" / "Maildir" / "new").iterdir()
    assert b"Subject: both versions" in stored.read_bytes()

    client = await ImapClient.connect(
        dovecot.host, dovecot.imaps_port, ssl_context=dovecot.client_ssl_context()
    )
    assert (await client.login("alice", "secret")).ok
    selected = await client.command("SELECT INBOX")
    assert b"* 1 EXISTS" in selected.untagged
    fetched = await client.command("FETCH 1 BODY.PEEK[HEADER.FIELDS (SUBJECT)]")
    assert any(b"Subject: both versions" in line for line in fetched.untagged), fetched
    await client.logout()
    # bob is another passwd-file user, with a mailbox of his own.
    bob = await ImapClient.connect(dovecot.host, dovecot.imap_port)
    assert (await bob.login("bob", "secret")).ok
    assert b"* 0 EXISTS" in (await bob.command("SELECT INBOX")).untagged
    await bob.logout()
