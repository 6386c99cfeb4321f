"""Modified UTF-7 (RFC 3501 5.1.3) and the comparison of mailbox names."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dovenotify import mailboxes

# Spellings as Dovecot lists them (checked on 2.3.19 and 2.4.1: CREATE, then LIST).
SPELLINGS = [
    ("INBOX", "INBOX"),
    ("Entw&APw-rfe", "Entwürfe"),
    ("&BB4EMQRABDAENwRGBEs-", "Образцы"),
    ("&g0l6Pw-", "草稿"),
    ("Archiv/2026", "Archiv/2026"),
    ("Archiv.2026", "Archiv.2026"),
    ("Q&-A", "Q&A"),
    ("&-&-", "&&"),
    ("&2D3eAA-", "\U0001f600"),  # outside the BMP: a UTF-16 surrogate pair
    ("a&AOQ-b&AOQ-c", "aäbäc"),
    ("&AAk-", "\t"),  # control characters are encoded, never sent raw
]


@pytest.mark.parametrize(("wire", "utf8"), SPELLINGS)
def test_decode_and_encode_the_spellings_dovecot_lists(wire, utf8):
    assert mailboxes.decode(wire) == utf8
    assert mailboxes.encode(utf8) == wire


def test_utf8_from_the_client_is_taken_as_it_is():
    assert mailboxes.decode("Entwürfe") == "Entwürfe"
    assert mailboxes.decode("草稿/Q&A") == "草稿/Q&A"


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        ("Entw&APw", "'&APw' starts an encoded part but has no closing -"),
        ("Entw&AP!-rfe", "'AP!' is not modified BASE64"),
        ("Q&A", "'&A' starts an encoded part"),
        ("&AP-", "&AP- is not UTF-16"),  # one byte and a half
        ("&2D0-", "&2D0- is not UTF-16"),  # a lone surrogate
        ("&AAA-", "it encodes a NUL character"),
        ("&AGE-", "it is not in its canonical form, which is 'a'"),  # "a" encoded
        ("&APw-&APw-", "canonical form, which is '&APwA,A-'"),  # two runs for one
        ("&APx-", "canonical form, which is '&APw-'"),  # low bits not zero
        ("a\tb", "it contains a control character"),
    ],
)
def test_malformed_spellings_are_refused_with_the_reason(wire, problem):
    with pytest.raises(mailboxes.MailboxNameError) as raised:
        mailboxes.decode(wire)
    assert problem in str(raised.value)


@given(st.text().filter(lambda s: "\0" not in s))
def test_every_name_round_trips(name):
    wire = mailboxes.encode(name)
    assert wire.isascii()
    assert mailboxes.decode(wire) == name


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E)))
def test_an_accepted_spelling_is_the_one_spelling_of_its_name(wire):
    try:
        name = mailboxes.decode(wire)
    except mailboxes.MailboxNameError:
        return
    assert mailboxes.encode(name) == wire


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("INBOX", "inbox", True),
        ("INBOX/Sub", "inbox/Sub", True),
        ("INBOX.Sub", "Inbox.Sub", True),
        ("INBOX/Sub", "INBOX/sub", False),  # only the INBOX part ignores case
        ("INBOXES", "inboxes", False),  # not INBOX: an ordinary name
        ("Entwürfe", "entwürfe", False),
    ],
)
def test_inbox_and_its_subfolders_match_in_any_case(a, b, same):
    assert (mailboxes.key(a) == mailboxes.key(b)) is same
