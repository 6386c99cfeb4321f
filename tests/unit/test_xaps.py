"""XAPPLEPUSHSERVICE argument parsing and answers."""

import pytest

from dovenotify import xaps

IOS = (
    b'A12 XAPPLEPUSHSERVICE "aps-version" "2" "aps-account-id" '
    b'"0715A26B-CA09-4730-A419-793000CA982E" "aps-device-token" '
    b'"2918390218931890821908309283098109381029309829018310983092892829" '
    b'"aps-subtopic" "com.apple.mobilemail" "mailboxes" ("INBOX" "Notes")'
)


def test_ios_form():
    assert xaps.parse(IOS) == xaps.Request(
        account_id="0715A26B-CA09-4730-A419-793000CA982E",
        device_token="2918390218931890821908309283098109381029309829018310983092892829",
        subtopic="com.apple.mobilemail",
        mailboxes=("INBOX", "Notes"),
        folders=("INBOX", "Notes"),
    )


def test_atoms_any_order_case_insensitive_unknown_keys_ignored():
    line = (
        b"t XAPPLEPUSHSERVICE mailboxes (INBOX) Aps-Subtopic com.apple.mobilemail "
        b"APS-DEVICE-TOKEN ABCDEF aps-account-id X1 future-key (a b) aps-version 2"
    )
    request = xaps.parse(line)
    assert (request.account_id, request.device_token, request.mailboxes) == (
        "X1",
        "abcdef",
        ("INBOX",),
    )


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ((b'"aps-version" "2"', b'"aps-version" "1"'), "aps-version 1 is not supported"),
        (
            (b'"2918390218931890821908309283098109381029309829018310983092892829"', b'""'),
            "aps-device-token is empty",
        ),
        (
            (b'"2918390218931890821908309283098109381029309829018310983092892829"', b'"xyz"'),
            "aps-device-token must be hexadecimal",
        ),
        (
            (
                b'"2918390218931890821908309283098109381029309829018310983092892829"',
                b'"' + b"a" * 201 + b'"',
            ),
            "longer than 200",
        ),
        ((b"com.apple.mobilemail", b"com.example"), "aps-subtopic must be com.apple.mobilemail"),
        ((b' "mailboxes" ("INBOX" "Notes")', b""), "mailboxes is missing"),
        ((b'("INBOX" "Notes")', b'("INBOX" "Notes"'), "unbalanced parentheses"),
        ((b'"Notes")', b'"Notes"))'), "unbalanced parentheses"),
        ((b'"aps-account-id" ', b'"aps-account-id'), "quoted string is not closed"),
    ],
)
def test_bad_input_names_the_problem(change, problem):
    with pytest.raises(xaps.XapsError, match=problem):
        xaps.parse(IOS.replace(*change))


def test_answer_confirms_each_mailbox_then_topic():
    assert xaps.answer(b"A12", "com.apple.mail.XServer.x", ("INBOX", 'A "b"')) == (
        b'* XAPPLEPUSHSERVICE "mailbox" "INBOX"\r\n'
        b'* XAPPLEPUSHSERVICE "mailbox" "A \\"b\\""\r\n'
        b'* XAPPLEPUSHSERVICE aps-version "2" aps-topic "com.apple.mail.XServer.x"\r\n'
        b"A12 OK XAPPLEPUSHSERVICE completed.\r\n"
    )


def test_mailboxes_are_stored_in_utf8_and_confirmed_as_spelled():
    line = IOS.replace(
        b'("INBOX" "Notes")', b'("INBOX" "Entw&APw-rfe" "&g0l6Pw-" "Entw\xc3\xbcrfe")'
    )
    request = xaps.parse(line)
    assert request.mailboxes == ("INBOX", "Entw&APw-rfe", "&g0l6Pw-", "Entwürfe")
    # The UTF-8 spelling and the modified UTF-7 one are one folder, stored once.
    assert request.folders == ("INBOX", "Entwürfe", "草稿")


def test_malformed_modified_utf7_is_refused_naming_the_mailbox():
    with pytest.raises(xaps.XapsError) as raised:
        xaps.parse(IOS.replace(b'"Notes"', b'"Entw&APw"'))
    assert str(raised.value) == (
        'mailbox "Entw&APw" is not valid modified UTF-7:'
        " '&APw' starts an encoded part but has no closing -"
    )
