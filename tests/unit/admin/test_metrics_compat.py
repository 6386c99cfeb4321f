"""Pure parts of the metrics exposition and of the xapsd API."""

import pytest

from dovenotify.admin.compat import CompatError, notify_status, parse_notify, parse_register
from dovenotify.admin.metrics import Histogram, Metrics, Samples
from dovenotify.apns import protocol as apns
from dovenotify.events.decoder import Event
from dovenotify.store.base import Registration

DEVICE = Registration("alice", "ACC", "ab" * 32, "topic", ("INBOX",))
SAMPLES = Samples(
    pending_pushes=0,
    registrations=1,
    relayed_connections=0,
    certificate_days_left=None,
    event_listener_problem=None,
)


def test_histogram_buckets_are_cumulative_and_keep_their_labels():
    m = Metrics(latency=Histogram(buckets=(0.5, 1, 10)))
    for value in (0.5, 5, 50):
        m.latency.observe(value)
    lines = m.render(SAMPLES).splitlines()
    name = "dovenotify_push_latency_seconds"
    assert [line for line in lines if line.startswith(name)] == [
        f'{name}_bucket{{le="0.5"}} 1.0',
        f'{name}_bucket{{le="1"}} 1.0',
        f'{name}_bucket{{le="10"}} 2.0',
        f'{name}_bucket{{le="+Inf"}} 3.0',
        f"{name}_count 3.0",
        f"{name}_sum 55.5",
    ]


def test_the_exposition_has_the_names_and_label_order_of_before():
    m = Metrics()
    m.pushed(DEVICE, apns.classify(400, b'{"reason":"Bad\\",result=\\"x"}'), now=1.0)
    text = m.render(SAMPLES)
    # result first, as before prometheus_client (which sorts labels) wrote the text;
    # a reason that looks like a label is only a value.
    assert 'dovenotify_pushes_total{result="config_error",reason="Bad\\",result=\\"x"} 1.0' in text
    assert 'dovenotify_events_dropped_total{reason="incomplete"} 0.0' in text
    assert "_created" not in text
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert names == {
        "dovenotify_pushes_total",
        "dovenotify_push_latency_seconds",
        "dovenotify_events_received_total",
        "dovenotify_events_dropped_total",
        "dovenotify_pending_pushes",
        "dovenotify_registrations",
        "dovenotify_relayed_connections",
        "dovenotify_apns_credentials_refused",
    }


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
