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


def outage(devices: int, jitter: float = 0.5) -> tuple[Outbox, float]:
    """An outbox whose `devices` pushes all failed with 503 until their backoffs
    reached the cap (300 s); and the time then."""
    outbox = Outbox(jitter=lambda: jitter)
    for n in range(devices):
        outbox.submit(device(f"{n:02x}"))
    now = 0.0
    for _ in range(12):
        while (taken := outbox.take(now)) is not None:
            assert outbox.failed(taken, now, shared=True)
        now = outbox.next_retry()  # type: ignore[assignment]
    # Each device waits out 300 s of its own now.
    assert min(at for _, at in outbox._waiting.values()) - now >= 150
    return outbox, now


def test_after_a_long_outage_one_probe_goes_at_the_outage_pace() -> None:
    outbox, now = outage(20)
    # The outage's pace is a minute at most, however long the devices' own backoffs.
    assert outbox.next_retry() is not None and outbox.next_retry() <= now + 60
    now = outbox.next_retry()
    probe = outbox.take(now)
    assert probe is not None
    # One at a time: nothing else goes while the probe is under way.
    assert outbox.take(now) is None
    assert outbox.take(now + 59) is None
    # APNs answers it normally: every other push goes at once.
    outbox.delivered(probe)
    assert outbox.resume() == 19
    sent = {outbox.take(now).device_token for _ in range(19)}  # type: ignore[union-attr]
    assert sent == {f"{n:02x}" for n in range(20)} - {probe.device_token}
    assert outbox.take(now) is None
    assert len(outbox) == 19  # in flight, none of them twice


def test_a_failed_probe_is_one_outage_failure_not_one_per_device() -> None:
    outbox, now = outage(20)
    first_due = min(at for _, at in outbox._waiting.values())
    for _ in range(3):
        now = outbox.next_retry()  # type: ignore[assignment]
        assert now < first_due
        probe = outbox.take(now)
        assert probe is not None and outbox.take(now) is None
        assert outbox.failed(probe, now, shared=True)
        # The device's own retry stays where it was, not pushed further out.
        assert outbox._waiting[probe.key][1] == first_due
        assert outbox.take(now) is None  # the next probe waits for the outage's pace
        assert outbox.next_retry() == now + 60


def test_probes_pace_from_a_second_up_to_the_bound() -> None:
    outbox = Outbox(jitter=lambda: 1.0, max_backoff=1e6, probe_interval=8)
    outbox.submit(device())
    now, waits = 0.0, []
    while (taken := outbox.take(now)) is not None and now < 200:
        outbox.failed(taken, now, shared=True)
        retry = outbox.next_retry()
        assert retry is not None
        waits.append(retry - now)
        now = retry
    # 1.5, 3, 6 (jittered), then never past the bound, while the device's own
    # backoff (1.5, 3, 6, 12, ...) grows to minutes: its own retries come between.
    assert waits[:4] == [1.5, 3, 6, 8]
    assert max(waits) == 8


def test_no_probe_while_a_push_is_under_way_or_for_a_device_of_its_own() -> None:
    outbox, now = outage(3)
    outbox.submit(device("ff"))  # mail for a device that was not waiting
    fresh = outbox.take(now)
    assert fresh is not None
    # Its answer will tell whether APNs is back: no probe beside it.
    assert outbox.take(now + 60) is None
    assert outbox.next_retry() - now >= 150  # type: ignore[operator]
    outbox.delivered(fresh)
    assert outbox.resume() == 3
    # A push whose device alone failed (429) is never a probe.
    outbox, now = Outbox(jitter=lambda: 0.5), 0.0
    outbox.submit(device())
    outbox.failed(outbox.take(now), now)  # type: ignore[arg-type]
    assert outbox.take(0.9) is None and outbox.next_retry() == 1


def test_a_probe_answered_for_its_device_alone_ends_the_outage_with_its_own_backoff() -> None:
    outbox, now = outage(3)
    now = outbox.next_retry()  # type: ignore[assignment]
    probe = outbox.take(now)
    assert probe is not None
    # A 429 for that device: APNs itself works, so the others go...
    assert outbox.resume() == 2
    assert outbox.failed(probe, now)
    assert {outbox.take(now).device_token for _ in range(2)} == {"00", "01", "02"} - {  # type: ignore[union-attr]
        probe.device_token
    }
    # ... and the probed device waits out its own, grown backoff.
    assert outbox._waiting[probe.key][1] - now >= 150


def test_the_retry_deadline_applies_to_a_probe() -> None:
    outbox = Outbox(retry_deadline=100, jitter=lambda: 0.5)
    outbox.submit(device())
    now = 0.0
    while (taken := outbox.take(now)) is not None:
        if not outbox.failed(taken, now, shared=True):
            break
        now = outbox.next_retry()  # type: ignore[assignment]
    assert 100 <= now < 160  # given up within a probe interval of the deadline
    assert len(outbox) == 0


def test_new_mail_for_the_probed_device_is_pushed_after_it() -> None:
    outbox, now = outage(2)
    now = outbox.next_retry()  # type: ignore[assignment]
    probe = outbox.take(now)
    assert probe is not None
    outbox.submit(probe)  # mail while the probe is under way
    outbox.failed(probe, now, shared=True)
    assert len(outbox) == 2  # still one push per device
    now = outbox.next_retry()  # type: ignore[assignment]
    assert outbox.take(now) == probe
    # Delivered, but the mail came after it left: one more push follows.
    outbox.submit(probe)
    outbox.delivered(probe)
    assert outbox.resume() == 1
    assert {outbox.take(now).device_token for _ in range(2)} == {"00", "01"}  # type: ignore[union-attr]
    assert outbox.take(now) is None


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["submit", "take", "fail", "outage", "deliver", "resume"]),
            st.integers(0, 9),
            st.floats(0, 120),
        ),
        max_size=300,
    )
)
def test_probes_never_push_a_device_twice_at_once(steps) -> None:
    outbox = Outbox(jitter=lambda: 0.5)
    taken: dict[str, Registration] = {}
    now = 0.0
    for action, n, later in steps:
        now += later
        token = f"{n:02x}"
        if action == "submit":
            outbox.submit(device(token))
        elif action == "take" and (registration := outbox.take(now)) is not None:
            assert registration.device_token not in taken
            taken[registration.device_token] = registration
        elif action in ("fail", "outage") and token in taken:
            outbox.failed(taken.pop(token), now, shared=action == "outage")
        elif action == "deliver" and token in taken:
            outbox.delivered(taken.pop(token))
        elif action == "resume":
            outbox.resume()
        assert len(outbox) <= 10
