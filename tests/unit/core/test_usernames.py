"""IMAP logins and LMTP recipients become one key."""

import pytest

from dovenotify.core.usernames import UserKeys


@pytest.mark.parametrize(
    ("format", "domain", "names", "key"),
    [
        ("lowercase", None, ["Alice@Example.org", "alice@example.org "], "alice@example.org"),
        ("localpart", None, ["alice", "Alice@example.org", "ALICE@other.net"], "alice"),
        ("full", "Example.org", ["alice", "ALICE", "alice@example.org"], "alice@example.org"),
    ],
)
def test_spellings_of_one_user_give_one_key(format, domain, names, key):
    keys = UserKeys(format, domain)
    assert {keys.key(name) for name in names} == {key}


def test_full_keeps_other_domains_apart():
    keys = UserKeys("full", "example.org")
    assert keys.key("alice@example.net") != keys.key("alice")


def test_full_without_domain_is_refused():
    with pytest.raises(ValueError, match="default_domain"):
        UserKeys("full")
