"""Pure parts of the metrics exposition and of the xapsd API."""

import pytest

from dovenotify import apns
from dovenotify.compat import CompatError, notify_status, parse_notify, parse_register
from dovenotify.events import Event
from dovenotify.metrics import Histogram, Metrics, Samples
from dovenotify.store import Registration

DEVICE = Registration("alice", "ACC", "ab" * 32, "topic", ("INBOX",))
SAMPLES = Samples(
    pending_pushes=0,
    registrations=1,
    relayed_connections=0,
    certificate_days_left=None,
    event_listener_problem=None,
)


def test_histogram_buckets_are_cumulative():
    h = Histogram(buckets=(1, 10))
    for value in (0.5, 5, 50):
        h.observe(value)
    assert h.lines("x") == [
        'x_bucket{le="1"} 1',
        'x_bucket{le="10"} 2',
        'x_bucket{le="+Inf"} 3',
        "x_sum 55.5",
        "x_count 3",
    ]


def test_reasons_are_escaped_and_latency_counts_delivered_pushes_only():
    m = Metrics()
    m.event(event=_event("MessageNew"), devices=[DEVICE], now=10.0)
    m.pushed(DEVICE, apns.transport_failure('bad "quote"\nline'), now=10.5)
    m.pushed(DEVICE, apns.Outcome(apns.Action.DELIVERED, 200), now=11.0)
    text = m.render(SAMPLES)
    assert 'dovenotify_pushes_total{result="retry",reason="transport"} 1' in text
    assert "dovenotify_push_latency_seconds_count 1" in text
    assert "dovenotify_push_latency_seconds_sum 1" in text
    # No certificate (token auth): no days-left sample at all, rather than a fake one.
    assert "dovenotify_certificate_days_left" not in text
    m.pushed(DEVICE, apns.classify(400, b'{"reason":"Bad\\"Topic"}'), now=12.0)
    assert 'reason="Bad\\"Topic"' in m.render(SAMPLES)


def test_credentials_refusal_sets_and_clears_health():
    m = Metrics()
    m.pushed(DEVICE, apns.transport_failure("ReadError: [SSL: TLSV1_ALERT_UNKNOWN_CA]"), 0)
    assert m.health_problems(SAMPLES) == [
        "APNs refuses our credentials: TLS ReadError: [SSL: TLSV1_ALERT_UNKNOWN_CA]"
    ]
    m.pushed(DEVICE, apns.transport_failure("ConnectError: connection refused"), 0)
    assert m.health_problems(SAMPLES)  # no answer yet: still refused as far as we know
    m.pushed(DEVICE, apns.classify(410, b'{"reason":"Unregistered"}'), 0)
    assert m.health_problems(SAMPLES) == []


def test_register_body_as_the_plugin_sends_it():
    call = parse_register(
        b'{"ApsAccountId":"A","ApsDeviceToken":"ABcd","ApsSubtopic":"com.apple.mobilemail",'
        b'"Username":"Alice@Example.org","Mailboxes": ["INBOX","Notes","Entw&APw-rfe"]}'
    )
    assert (call.username, call.device_token, call.mailboxes) == (
        "alice@example.org",
        "abcd",
        ("INBOX", "Notes", "Entwürfe"),  # as Dovecot's events name it
    )
    with pytest.raises(
        CompatError, match="Mailboxes: \"Entw&APw\" is not valid modified UTF-7: '&APw' starts"
    ):
        parse_register(
            b'{"ApsAccountId":"A","ApsDeviceToken":"AB","ApsSubtopic":"com.apple.mobilemail",'
            b'"Username":"alice","Mailboxes": ["Entw&APw"]}'
        )


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"Username":"a","Mailbox":""}',
        b'{"Username":"a","Mailbox":"INBOX","Events":"MessageNew"}',
        b'{"Username":7,"Mailbox":"INBOX"}',
    ],
)
def test_bad_notify_bodies(body):
    with pytest.raises(CompatError):
        parse_notify(body)


def test_notify_status():
    assert notify_status([], "INBOX") == 404
    assert notify_status([DEVICE], "Junk") == 204
    assert notify_status([DEVICE], "inbox") == 200


def _event(name):
    return Event(name=name, username="alice", mailbox="INBOX", service="lmtp")
