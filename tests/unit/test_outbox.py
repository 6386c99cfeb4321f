"""The outbox and the sending gate: backoff, coalescing, pausing (pure, no clock)."""

from hypothesis import given
from hypothesis import strategies as st

from dovenotify.outbox import Gate, Outbox
from dovenotify.store import Registration


def device(token: str = "aa") -> Registration:
    return Registration("alice", "ACCOUNT", token, "topic", ("INBOX",), registered_at=0)


def test_new_mail_does_not_cut_a_backoff_short() -> None:
    outbox = Outbox(jitter=lambda: 0.5)
    outbox.submit(device())
    assert outbox.take(0) == device()
    assert outbox.failed(device(), now=0)  # retry at 1
    outbox.submit(device())
    assert outbox.take(0.5) is None
    assert outbox.take(1) == device()
    assert len(outbox) == 1  # one pending push per device, however much mail came


def test_backoff_doubles_up_to_the_cap_then_gives_up_at_the_deadline() -> None:
    outbox = Outbox(retry_deadline=100, max_backoff=16, jitter=lambda: 0.5)
    outbox.submit(device())
    now, waits = 0.0, []
    while (taken := outbox.take(now)) is not None:
        if not outbox.failed(taken, now):
            break
        retry = outbox.next_retry()
        assert retry is not None
        waits.append(retry - now)
        now = retry
    assert waits[:6] == [1, 2, 4, 8, 16, 16]
    assert now >= 100
    assert len(outbox) == 0


def test_hold_keeps_a_push_without_counting_a_failure() -> None:
    outbox = Outbox(jitter=lambda: 0.5)
    outbox.submit(device())
    outbox.hold(outbox.take(0))  # type: ignore[arg-type]
    assert outbox.take(0) == device()


def test_gate_closes_once_per_broken_connection_and_backs_off() -> None:
    gate = Gate(jitter=lambda: 0.5)
    assert gate.is_open(0)
    gate.transport_failed(0)
    # Other pushes in flight on the same connection fail at the same moment.
    gate.transport_failed(0.01)
    assert gate.opens_at() == 1
    gate.transport_failed(1)
    assert gate.opens_at() == 3
    gate.answered()
    gate.transport_failed(10)
    assert gate.opens_at() == 11


def test_gate_refusal_alarms_once_and_reopens_on_new_credentials() -> None:
    gate = Gate(refused_probe=600)
    assert gate.refuse("403 BadCertificate", 0)
    assert not gate.refuse("403 BadCertificate", 1)
    assert not gate.is_open(300)
    assert gate.is_open(601)  # one probe, in case Apple changed its mind
    gate.reopen()
    assert gate.is_open(2) and gate.refused is None


@given(
    st.lists(
        st.tuples(st.sampled_from(["submit", "take", "fail", "deliver"]), st.integers(0, 9)),
        max_size=300,
    )
)
def test_at_most_one_pending_push_per_device_whatever_happens(steps) -> None:
    # While APNs is down, memory is bounded by the number of devices, not events.
    outbox = Outbox(jitter=lambda: 0.5)
    taken: dict[str, Registration] = {}
    now = 0.0
    for action, n in steps:
        now += 0.7
        token = f"{n:02x}"
        if action == "submit":
            outbox.submit(device(token))
        elif action == "take" and (registration := outbox.take(now)) is not None:
            taken[registration.device_token] = registration
        elif action == "fail" and token in taken:
            outbox.failed(taken.pop(token), now)
        elif action == "deliver" and token in taken:
            outbox.delivered(taken.pop(token))
        assert len(outbox) <= 10


def test_gate_tells_each_kind_of_trouble_once_per_outage() -> None:
    gate = Gate()
    assert gate.recovered(0) is None
    assert gate.trouble("unreachable", 10)
    assert not gate.trouble("unreachable", 11)
    assert gate.trouble("503", 12)
    assert gate.recovered(40) == 30
    assert gate.recovered(41) is None
    assert gate.trouble("unreachable", 50)  # a new outage is told again


def test_resume_sends_what_waited_for_apns_but_not_what_waited_for_its_device() -> None:
    outbox = Outbox(jitter=lambda: 0.5)
    for token in ("aa", "bb", "cc"):
        outbox.submit(device(token))
    a, b, c = (outbox.take(0) for _ in range(3))
    outbox.failed(a, 0, shared=True)  # 503
    outbox.failed(b, 0, shared=True)
    outbox.failed(c, 0)  # 429: that device's own backoff
    assert outbox.resume() == 2
    assert {outbox.take(0.1).device_token, outbox.take(0.1).device_token} == {"aa", "bb"}
    assert outbox.take(0.1) is None
    assert outbox.take(1).device_token == "cc"
