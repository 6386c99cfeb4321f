import json
import ssl
import sys
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from dovenotify.apns.certificates import load_credentials
from dovenotify.apns.protocol import (
    UNPARSEABLE,
    Action,
    Outcome,
    Push,
    build_request,
    classify,
    transport_failure,
)
from dovenotify.apns.sender import ApnsSender
from tests.harness.apns_standin import (
    HANG,
    Answer,
    ApnsStandin,
    RecordedRequest,
    run_apns_standin,
)
from tests.harness.certs import Pki
from tests.harness.dovecot import free_ports
from tests.harness.tcp_proxy import run_tcp_proxy

TOKEN = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"  # made up
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"  # the example from the docs


def _error(reason: str, **extra: object) -> bytes:
    return json.dumps({"reason": reason, **extra}).encode()


# --- pure: request ------------------------------------------------------------------


def test_build_request() -> None:
    push = Push(TOKEN, "com.apple.mail.XServer.x", ACCOUNT)
    request = build_request(push, now=1_700_000_000.7)
    assert request.path == f"/3/device/{TOKEN}"
    assert request.headers == {
        "apns-topic": "com.apple.mail.XServer.x",
        "apns-push-type": "background",
        "apns-expiration": str(1_700_000_000 + 86400),
    }
    assert request.body == b'{"aps":{"account-id":"0715A26B-CA09-4730-A419-793000CA982E"}}'


def test_build_request_with_priority() -> None:
    push = Push(TOKEN, "t", ACCOUNT, push_type="alert", expiration_seconds=60, priority=5)
    headers = build_request(push, now=100).headers
    assert headers["apns-priority"] == "5"
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-expiration"] == "160"


@pytest.mark.parametrize("token", ["", "../../x", "abc/def", "ab cd", "zz"])
def test_push_refuses_tokens_that_are_not_hex(token: str) -> None:
    with pytest.raises(ValueError, match="hex"):
        Push(token, "t", ACCOUNT)


# --- pure: answers ------------------------------------------------------------------

CLASSIFY_TABLE = [
    (200, b"", Action.DELIVERED, ""),
    (410, _error("Unregistered", timestamp=1700000000123), Action.DROP_TOKEN, "Unregistered"),
    (410, _error("ExpiredToken", timestamp=1700000000123), Action.DROP_TOKEN, "ExpiredToken"),
    (400, _error("BadDeviceToken"), Action.DROP_TOKEN, "BadDeviceToken"),
    (400, _error("DeviceTokenNotForTopic"), Action.TOKEN_NOT_FOR_TOPIC, "DeviceTokenNotForTopic"),
    (429, _error("TooManyRequests"), Action.RETRY, "TooManyRequests"),
    (500, _error("InternalServerError"), Action.RETRY, "InternalServerError"),
    (503, _error("ServiceUnavailable"), Action.RETRY, "ServiceUnavailable"),
    (503, _error("Shutdown"), Action.RETRY, "Shutdown"),
    (403, _error("BadCertificate"), Action.CONFIG_ERROR, "BadCertificate"),
    (403, _error("BadCertificateEnvironment"), Action.CONFIG_ERROR, "BadCertificateEnvironment"),
    (403, _error("Forbidden"), Action.CONFIG_ERROR, "Forbidden"),
    (400, _error("BadTopic"), Action.CONFIG_ERROR, "BadTopic"),
    (400, _error("TopicDisallowed"), Action.CONFIG_ERROR, "TopicDisallowed"),
    (400, _error("MissingTopic"), Action.CONFIG_ERROR, "MissingTopic"),
    (400, _error("InvalidPushType"), Action.CONFIG_ERROR, "InvalidPushType"),
    (400, _error("BadExpirationDate"), Action.CONFIG_ERROR, "BadExpirationDate"),
    (400, _error("PayloadEmpty"), Action.CONFIG_ERROR, "PayloadEmpty"),
    (404, _error("BadPath"), Action.CONFIG_ERROR, "BadPath"),
    (405, _error("MethodNotAllowed"), Action.CONFIG_ERROR, "MethodNotAllowed"),
    (413, _error("PayloadTooLarge"), Action.CONFIG_ERROR, "PayloadTooLarge"),
    # Malformed bodies: the status still decides.
    (503, b"<html>bad gateway</html>", Action.RETRY, UNPARSEABLE),
    (410, b"{not json", Action.DROP_TOKEN, UNPARSEABLE),
    (400, b"", Action.CONFIG_ERROR, UNPARSEABLE),
    (400, b'["BadDeviceToken"]', Action.CONFIG_ERROR, UNPARSEABLE),
    (403, b"\xff\xfe", Action.CONFIG_ERROR, UNPARSEABLE),
    # Undocumented statuses: server trouble is retried, anything else is ours to fix.
    (502, b"", Action.RETRY, UNPARSEABLE),
    (418, _error("Teapot"), Action.CONFIG_ERROR, "Teapot"),
]


@pytest.mark.parametrize(("status", "body", "action", "reason"), CLASSIFY_TABLE)
def test_classify(status: int, body: bytes, action: Action, reason: str) -> None:
    outcome = classify(status, body)
    assert (outcome.action, outcome.status, outcome.reason) == (action, status, reason)


def test_classify_keeps_the_410_timestamp_in_ms() -> None:
    outcome = classify(410, _error("Unregistered", timestamp=1700000000123), apns_id="ID")
    assert outcome == Outcome(Action.DROP_TOKEN, 410, "Unregistered", 1700000000123, "ID")


def test_classify_ignores_timestamps_elsewhere_and_odd_ones() -> None:
    assert classify(400, _error("BadDeviceToken", timestamp=5)).timestamp_ms is None
    assert classify(410, _error("Unregistered", timestamp="soon")).timestamp_ms is None
    assert classify(410, _error("Unregistered")).timestamp_ms is None


def test_transport_failure_is_a_retry() -> None:
    outcome = transport_failure("ReadError: connection reset")
    assert outcome.retryable
    assert (outcome.status, outcome.reason) == (None, "ReadError: connection reset")


# --- the sender against the stand-in ------------------------------------------------


def _sender(
    pki: Pki, standin: ApnsStandin, port: int | None = None, **options: object
) -> ApnsSender:
    """A sender to the stand-in, or through a proxy to it on `port`."""
    credentials = load_credentials(pki.client.combined_pem)
    endpoint = standin.url if port is None else f"https://127.0.0.1:{port}"
    return ApnsSender(credentials, endpoint=endpoint, ca_file=pki.ca_file, **options)


def _push(pki: Pki) -> Push:
    return Push(TOKEN, pki.client.topic, ACCOUNT)


async def test_sender_sends_the_exact_request(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    async with _sender(test_pki, apns_standin, clock=lambda: 1_700_000_000.5) as sender:
        outcome = await sender.send(_push(test_pki))
    request = await apns_standin.next_request()

    assert outcome.action is Action.DELIVERED
    assert outcome.apns_id
    assert request.http_version == "2"
    assert (request.method, request.path) == ("POST", f"/3/device/{TOKEN}")
    assert request.headers["apns-topic"] == test_pki.client.topic
    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-expiration"] == str(1_700_000_000 + 86400)
    assert "apns-priority" not in request.headers
    assert request.body == b'{"aps":{"account-id":"0715A26B-CA09-4730-A419-793000CA982E"}}'
    # The client certificate the stand-in saw is ours.
    assert [c.subject for c in apns_standin.peer_certificates] == [
        load_credentials(test_pki.client.combined_pem).certificate.subject
    ]


async def test_sender_reuses_one_connection(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    async with _sender(test_pki, apns_standin) as sender:
        for _ in range(3):
            assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
    assert len({r.client for r in apns_standin.requests}) == 1
    assert len(apns_standin.peer_certificates) == 1


async def test_410_drops_the_token_with_its_timestamp(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    apns_standin.queue_answers((410, {"reason": "Unregistered", "timestamp": 1700000000123}))
    async with _sender(test_pki, apns_standin) as sender:
        outcome = await sender.send(_push(test_pki))
    assert (outcome.action, outcome.reason, outcome.timestamp_ms) == (
        Action.DROP_TOKEN,
        "Unregistered",
        1700000000123,
    )


async def test_503_is_a_retry(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    apns_standin.queue_answers(Answer(503, {"reason": "ServiceUnavailable"}))
    async with _sender(test_pki, apns_standin) as sender:
        outcome = await sender.send(_push(test_pki))
        assert (outcome.action, outcome.status) == (Action.RETRY, 503)
        # The connection survives an error answer.
        assert (await sender.send(_push(test_pki))).action is Action.DELIVERED


async def test_standin_gone_mid_request_is_a_retry_not_an_exception(test_pki: Pki) -> None:
    outcomes: list[Outcome] = []
    async with (
        run_apns_standin(test_pki, answers=(HANG,)) as standin,
        _sender(test_pki, standin) as sender,
        trio.open_nursery() as nursery,
    ):

        async def send() -> None:
            outcomes.append(await sender.send(_push(test_pki)))

        nursery.start_soon(send)
        await standin.next_request()
        standin.abort()
    [outcome] = outcomes
    assert outcome.action is Action.RETRY
    assert outcome.status is None
    assert outcome.reason


async def test_connection_closed_while_idle_is_replaced(test_pki: Pki) -> None:
    # The server drops the idle connection (here: APNs restarts); the next push must not
    # be lost to the dead connection.
    (port,) = free_ports(1)
    credentials = load_credentials(test_pki.client.combined_pem)
    url = f"https://127.0.0.1:{port}"
    async with ApnsSender(credentials, endpoint=url, ca_file=test_pki.ca_file) as sender:
        async with run_apns_standin(test_pki, port=port) as first:
            assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
        async with run_apns_standin(test_pki, port=port) as second:
            assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
            assert len(second.requests) == 1
    assert len(first.requests) == 1


async def test_no_server_is_a_retry(test_pki: Pki) -> None:
    async with run_apns_standin(test_pki) as standin:
        pass  # stopped: its port now refuses connections
    async with _sender(test_pki, standin) as sender:
        outcome = await sender.send(_push(test_pki))
    assert (outcome.action, outcome.status) == (Action.RETRY, None)
    assert "ConnectError" in outcome.reason


async def test_no_answer_in_time_is_a_retry(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    apns_standin.queue_answers(HANG)
    async with _sender(test_pki, apns_standin, timeout=0.5) as sender:
        outcome = await sender.send(_push(test_pki))
    assert (outcome.action, outcome.status) == (Action.RETRY, None)
    assert "Timeout" in outcome.reason


async def open_streams_of_twenty(
    test_pki: Pki, standin: ApnsStandin, sender: ApnsSender, gate: trio.Event, expected: int
) -> None:
    """Send 20 pushes the stand-in holds until `gate`; check `expected` are open at once."""
    outcomes: list[Outcome] = []

    async def send() -> None:
        outcomes.append(await sender.send(_push(test_pki)))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(send)
        for _ in range(expected):
            await standin.next_request()
        # Give one more request every chance to arrive before checking it did not.
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert len(standin.requests) == expected
        gate.set()
    assert [o.action for o in outcomes] == [Action.DELIVERED] * 20


def held_until(gate: trio.Event) -> Callable[[object], Awaitable[Answer]]:
    async def held(_request: object) -> Answer:
        await gate.wait()
        return Answer(200)

    return held


async def test_in_flight_requests_are_bounded(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    gate = trio.Event()
    apns_standin.responder = held_until(gate)
    async with _sender(test_pki, apns_standin, max_in_flight=8) as sender:
        await open_streams_of_twenty(test_pki, apns_standin, sender, gate, expected=8)


async def test_the_servers_stream_limit_is_respected(test_pki: Pki) -> None:
    gate = trio.Event()
    async with (
        run_apns_standin(test_pki, responder=held_until(gate), max_concurrent_streams=4) as standin,
        _sender(test_pki, standin, max_in_flight=16) as sender,
    ):
        # Four open streams, as the server's SETTINGS allow, though 16 would be ours.
        await open_streams_of_twenty(test_pki, standin, sender, gate, expected=4)
    assert len({r.client for r in standin.requests}) == 1


async def test_goaway_with_requests_in_flight_pushes_each_device_exactly_once(
    test_pki: Pki,
) -> None:
    tokens = [f"{n:02x}" * 32 for n in range(12)]
    everyone = trio.Event()

    async def held(_request: object) -> Answer:
        # Nothing is answered before every device's push has reached the stand-in:
        # each GOAWAY comes with requests in flight on both sides of its last id.
        if {r.path for r in standin.requests} == {f"/3/device/{t}" for t in tokens}:
            everyone.set()
        await everyone.wait()
        return Answer(200)

    outcomes: list[Outcome] = []
    # GOAWAY on a connection's fifth request, whose stream is its last stream id.
    async with (
        run_apns_standin(test_pki, responder=held, keep_alive_max_requests=4) as standin,
        _sender(test_pki, standin) as sender,
        trio.open_nursery() as nursery,
    ):

        async def send(token: str) -> None:
            outcomes.append(await sender.send(Push(token, test_pki.client.topic, ACCOUNT)))

        for token in tokens:
            nursery.start_soon(send, token)
    assert [o.action for o in outcomes] == [Action.DELIVERED] * len(tokens)
    # Counted where they arrive: the five up to each GOAWAY's last stream id were
    # answered there, the rest went again on the next connection. None twice.
    pushed = Counter(r.path.rsplit("/", 1)[1] for r in standin.requests)
    assert pushed == {token: 1 for token in tokens}
    assert Counter(Counter(r.client for r in standin.requests).values()) == {5: 2, 2: 1}


async def test_idle_ping_replaces_a_black_holed_connection_before_the_next_push(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    async with (
        run_tcp_proxy(apns_standin.port) as proxy,
        _sender(test_pki, apns_standin, proxy.port, timeout=1.0, idle_ping=0.2) as sender,
    ):
        assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
        # The path dies silently while the connection is idle.
        proxy.black_hole()
        # Unanswered, the PING after 0.2 s idle makes the sender drop it.
        with trio.fail_after(5):
            await proxy.dropped.wait()
        started = trio.current_time()
        outcome = await sender.send(_push(test_pki))
        took = trio.current_time() - started
    assert outcome.action is Action.DELIVERED
    # Straight onto a new connection, not after waiting out the 1 s timeout.
    assert took < 1.0
    assert proxy.accepted == 2
    assert len({r.client for r in apns_standin.requests}) == 2


async def test_a_connection_hung_as_a_whole_is_replaced(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    async with (
        run_tcp_proxy(apns_standin.port) as proxy,
        _sender(test_pki, apns_standin, proxy.port, timeout=0.5) as sender,
    ):
        assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
        proxy.black_hole()
        hung = await sender.send(_push(test_pki))
        # The timed-out stream is followed by a PING; unanswered, it ends the
        # connection, so the next push does not wait on it too.
        with trio.fail_after(5):
            await proxy.dropped.wait()
        after = await sender.send(_push(test_pki))
    assert (hung.action, hung.status) == (Action.RETRY, None)
    assert hung.reason.startswith("ReadTimeout")
    assert after.action is Action.DELIVERED
    assert proxy.accepted == 2


async def test_new_credentials_take_over_while_pushes_in_flight_finish(
    test_pki: Pki, apns_standin: ApnsStandin
) -> None:
    gate = trio.Event()

    async def first_held(request: RecordedRequest) -> Answer:
        if len(apns_standin.requests) == 1:
            await gate.wait()
        return Answer(200)

    apns_standin.responder = first_held
    renewed = load_credentials(test_pki.client_renewed.combined_pem)
    outcomes: list[Outcome] = []
    async with _sender(test_pki, apns_standin) as sender, trio.open_nursery() as nursery:

        async def send() -> None:
            outcomes.append(await sender.send(_push(test_pki)))

        nursery.start_soon(send)
        await apns_standin.next_request()
        # A reload: the connection in use takes no new pushes...
        sender.configure(renewed, endpoint=apns_standin.url, ca_file=test_pki.ca_file)
        assert (await sender.send(_push(test_pki))).action is Action.DELIVERED
        # ... and the push in flight on it is answered there.
        gate.set()
    assert [o.action for o in outcomes] == [Action.DELIVERED]
    first, second = apns_standin.requests
    assert first.client != second.client
    assert apns_standin.peer_certificates == [
        load_credentials(test_pki.client.combined_pem).certificate,
        renewed.certificate,
    ]


@pytest.mark.parametrize("who", ["no certificate", "certificate from another issuer"])
async def test_standin_refuses_clients_without_a_trusted_certificate(
    test_pki: Pki, apns_standin: ApnsStandin, who: str
) -> None:
    context = ssl.create_default_context(cafile=str(test_pki.ca_file))
    if who != "no certificate":
        context.load_cert_chain(test_pki.client_stranger.combined_pem)
    async with httpx.AsyncClient(http2=True, verify=context) as client:
        with pytest.raises(httpx.TransportError):
            await client.post(f"{apns_standin.url}/3/device/{TOKEN}", content=b"{}")
    assert apns_standin.requests == []
    assert apns_standin.peer_certificates == []


SEND_FROM_ANOTHER_PROCESS = """
import sys, trio
from pathlib import Path
from dovenotify.apns.protocol import Push
from dovenotify.apns.sender import ApnsSender
from dovenotify.apns.certificates import load_credentials

async def main(url, ca_file, certificate, token, account):
    credentials = load_credentials(Path(certificate))
    async with ApnsSender(credentials, endpoint=url, ca_file=Path(ca_file)) as sender:
        outcome = await sender.send(Push(token, credentials.topic, account))
    print(outcome.action.value)

trio.run(main, *sys.argv[1:])
"""


async def test_standin_serves_another_process(test_pki: Pki, apns_standin: ApnsStandin) -> None:
    # End-to-end tests run dovenotify as a subprocess against the in-process stand-in.
    command = [sys.executable, "-c", SEND_FROM_ANOTHER_PROCESS, apns_standin.url]
    command += [str(test_pki.ca_file), str(test_pki.client.p12), TOKEN, ACCOUNT]
    repo = Path(__file__).resolve().parents[2]
    result = await trio.run_process(command, capture_stdout=True, cwd=repo)
    assert result.stdout.decode().split() == ["delivered"]
    request = await apns_standin.next_request()
    assert (request.http_version, request.headers["apns-topic"]) == ("2", test_pki.client.topic)
