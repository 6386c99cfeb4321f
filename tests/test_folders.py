"""Folders beyond INBOX, on real Dovecot 2.3 and 2.4: names as iOS spells them.

iOS registers mailboxes in IMAP's modified UTF-7 (`Entw&APw-rfe`), as Dovecot
lists them; Dovecot's events name them in UTF-8 (`Entwürfe`), with the namespace's
hierarchy separator. Each test registers simulated iPhones over the real relay,
delivers (LMTP to `alice+folder`, Dovecot's lmtp_save_to_detail_mailbox) and
APPENDs into one folder after another, and reads which phones the APNs stand-in
was asked to push, ending with a mail to INBOX as a marker that nothing else
was queued.
"""

from __future__ import annotations

import trio

from tests.harness.dovecot import Dovecot, deliver, deliver_lda
from tests.harness.imap_client import ImapClient
from tests.harness.stack import run_stack
from tests.test_semantics import MESSAGE, TIMING, account, lmtp, ok, phones_pushed, register, token

DETAIL_MAILBOX = """
lmtp_save_to_detail_mailbox = yes
recipient_delimiter = +
"""
DOT_SEPARATOR = """
namespace inbox {
  separator = .
}
"""


async def deliver_into(d: Dovecot, folder: str) -> None:
    """Deliver a mail into `folder` (UTF-8) as an MTA does."""
    if d.version == "2.3" and not folder.isascii():
        # Dovecot 2.3's LMTP offers no SMTPUTF8 and refuses an 8-bit address
        # (501); an MTA hands such a mail to dovecot-lda instead.
        await trio.to_thread.run_sync(lambda: deliver_lda(d, "alice", MESSAGE, mailbox=folder))
    else:
        await trio.to_thread.run_sync(deliver, d, f"alice+{folder}", MESSAGE)


async def test_folders_named_as_ios_spells_them_push_their_devices_only(test_pki, dovecot_version):
    folders = [
        ("Entw&APw-rfe", "Entwürfe"),
        ("&BB4EMQRABDAENwRGBEs-", "Образцы"),
        ("&g0l6Pw-", "草稿"),
        ("Archiv/2026", "Archiv/2026"),
    ]
    conf = DETAIL_MAILBOX
    async with run_stack(test_pki, TIMING, version=dovecot_version, dovecot_conf=conf) as stack:
        # Phones 1-4 as iOS registers (the helper checks each confirmation echoes
        # the spelling sent); phone 5 sends UTF-8 itself; phone 6 only INBOX.
        registrations = [*((n, [s]) for n, (s, _) in enumerate(folders, start=1))]
        registrations += [(5, ["Entwürfe"]), (6, ["INBOX"])]
        for n, mailboxes in registrations:
            await register(stack, n, mailboxes)
        admin = await stack.iphone()
        # A malformed name is refused, with the reason, and nothing is stored.
        reply = await admin.xapplepushservice(account(7), token(7), ["INBOX", "Entw&APw"])
        assert (reply.untagged, reply.tagged) == (
            (),
            f'{reply.tag} BAD XAPPLEPUSHSERVICE: mailbox "Entw&APw" is not valid modified'
            " UTF-7: '&APw' starts an encoded part but has no closing -.".encode(),
        )
        for spelled, _ in folders:
            await ok(admin, f'CREATE "{spelled}"')
        expected = {"Entwürfe": [1, 5], "Образцы": [2], "草稿": [3], "Archiv/2026": [4]}
        for spelled, folder in folders:
            await deliver_into(stack.dovecot, folder)
            assert sorted(await phones_pushed(stack, len(expected[folder]))) == expected[folder]
            assert (await admin.append(spelled, MESSAGE)).ok
            assert sorted(await phones_pushed(stack, len(expected[folder]))) == expected[folder]
        await lmtp(stack)
        assert await phones_pushed(stack, 1) == [6]
        assert len(stack.standin.requests) == 2 * 5 + 1


async def test_a_dot_separator_and_inbox_subfolders(test_pki, dovecot_version):
    conf = DETAIL_MAILBOX + DOT_SEPARATOR
    async with run_stack(test_pki, TIMING, version=dovecot_version, dovecot_conf=conf) as stack:
        # Dovecot upper-cases INBOX before its separator: its events say INBOX.Sub.
        for n, mailboxes in ((1, ["Archiv.2026"]), (2, ["inbox.Sub"]), (3, ["Archiv", "INBOX"])):
            await register(stack, n, mailboxes)
        admin = await stack.iphone()
        await ok(admin, 'CREATE "Archiv.2026"')
        await ok(admin, 'CREATE "INBOX.Sub"')
        for spelled, phone in (("Archiv.2026", 1), ("INBOX.Sub", 2)):
            await deliver_into(stack.dovecot, spelled)
            assert await phones_pushed(stack, 1) == [phone]
            assert (await admin.append(spelled, MESSAGE)).ok
            assert await phones_pushed(stack, 1) == [phone]
        await lmtp(stack)
        assert await phones_pushed(stack, 1) == [3]
        assert len(stack.standin.requests) == 5


async def test_neither_dovecot_offers_utf8_accept(dovecot: Dovecot):
    """A client's names are modified UTF-7 unless it enabled UTF8=ACCEPT (RFC 6855), which
    neither version offers (2.4.1 has no `mail_utf8` either): the relay need not follow
    ENABLE. This fails when a version does; then xaps.parse must learn of the ENABLE."""
    client = await ImapClient.connect(
        dovecot.host, dovecot.imaps_port, ssl_context=dovecot.client_ssl_context()
    )
    async with client:
        await client.login("alice", "secret")
        assert not [c for c in await client.capability() if c.startswith("UTF8=")]
        reply = await client.command("ENABLE UTF8=ACCEPT")
        assert reply.ok
        assert not [line for line in reply.untagged if b"UTF8=ACCEPT" in line.upper()]
