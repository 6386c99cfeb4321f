"""The configuration keys of notification semantics: defaults and the errors that name them."""

from pathlib import Path

import pytest

from dovenotify.config import ConfigError, parse

PATH = Path("/etc/dovenotify/dovenotify.yaml")


def test_defaults():
    config = parse("", PATH)
    assert (config.delay, config.max_delay) == (30.0, 120.0)
    assert config.push_services == ("imap", "lmtp", "lda", "pop3")
    assert (config.username_format, config.default_domain) == ("lowercase", None)
    assert config.event_peers is None


def test_values():
    config = parse(
        "delay: 1\nmax_delay: 3\npush_services: [imap, doveadm]\n"
        "username_format: full\ndefault_domain: Example.org\nevent_peers: [vmail, '@mail', 5000]\n"
        "event_spool: spool/events\n",
        PATH,
    )
    assert (config.delay, config.max_delay) == (1, 3)
    assert config.push_services == ("imap", "doveadm")
    assert config.default_domain == "example.org"
    assert config.event_peers == ("vmail", "@mail", "5000")
    assert config.event_spool == Path("/etc/dovenotify/spool/events")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("delay: 60\nmax_delay: 30\n", "line 2: max_delay (30 s) is shorter than delay (60 s)"),
        ("username_format: full\n", "line 1: username_format 'full' needs default_domain"),
        ("username_format: upper\n", "expected one of lowercase, localpart, full"),
        ("default_domain: a@b\n", "expected a mail domain"),
        ("push_services: imap\n", "expected a list of Dovecot service names"),
    ],
)
def test_errors_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text, PATH)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('"0\'": 1\n', 'unknown key "0\'"'),
        ('"a.b": 1\n', 'unknown key "a.b"'),
        ('"red\\e[31m": 1\n', 'unknown key "red\\u001b[31m"'),
        ("apns:\n  endpont: x\n", "unknown key 'apns.endpont' (did you mean 'apns.endpoint'?)"),
    ],
)
def test_an_unknown_key_is_shown_unambiguously_and_escaped(text, shown):
    with pytest.raises(ConfigError) as error:
        parse(text, PATH)
    assert str(error.value).endswith(shown)
