"""The sans-I/O HTTP/2 client against h2's own server side, bytes handed across by hand."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hyperframe.frame import DataFrame, HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from dovenotify.apns.http2 import MALFORMED, Answered, ClientConnection, PingAcked, Unanswered

BODY = b'{"aps":{"account-id":"X"}}'


def request(path: str = "/3/device/ab") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"apns.test"),
        (b":path", path.encode()),
        (b"apns-topic", b"t"),
    ]


class Server:
    """h2's server side, recording what reaches it."""

    def __init__(self, **settings: int) -> None:
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        codes = {getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()}
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values=codes)
        self.h2.initiate_connection()
        self.requests: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytes] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}

    def take(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.requests[event.stream_id] = event.headers
                self.bodies[event.stream_id] = b""
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code

    def answer(self, stream_id: int, status: int = 200, body: bytes = b"") -> None:
        headers = [(b":status", str(status).encode()), (b"apns-id", f"id-{stream_id}".encode())]
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        if body:
            self.h2.send_data(stream_id, body, end_stream=True)


def pump(client: ClientConnection, server: Server) -> list:
    """Hand bytes both ways until neither side has more; the client's events."""
    events: list = []
    while True:
        to_server, to_client = client.data_to_send(), server.h2.data_to_send()
        if not to_server and not to_client:
            return events
        if to_server:
            server.take(to_server)
        if to_client:
            events += client.receive(to_client)


def connected(max_streams: int = 64, **settings: int) -> tuple[ClientConnection, Server]:
    client, server = ClientConnection(max_streams), Server(**settings)
    assert pump(client, server) == []
    assert client.settled
    return client, server


def test_a_request_and_its_answer() -> None:
    client, server = connected()
    assert client.submit("t1", request(), BODY) == []
    pump(client, server)
    [(stream_id, headers)] = server.requests.items()
    assert (b":path", b"/3/device/ab") in headers
    assert server.bodies[stream_id] == BODY and stream_id in server.ended
    server.answer(stream_id, 410, b'{"reason":"Unregistered"}')
    [answer] = pump(client, server)
    assert answer == Answered(
        "t1",
        410,
        [(b":status", b"410"), (b"apns-id", f"id-{stream_id}".encode())],
        b'{"reason":"Unregistered"}',
    )
    assert answer.header(b"apns-id") == f"id-{stream_id}".encode()
    assert client.open_streams == 0


def test_nothing_is_sent_before_the_servers_settings() -> None:
    client, server = ClientConnection(64), Server(max_concurrent_streams=1)
    client.submit("t1", request(), BODY)
    client.submit("t2", request(), BODY)
    # Only the preface went out: the server's limit is not known yet.
    server.take(client.data_to_send())
    assert server.requests == {}
    pump(client, server)
    assert len(server.requests) == 1


def test_the_servers_stream_limit_holds_and_the_rest_follow_in_order() -> None:
    client, server = connected(max_streams=64, max_concurrent_streams=2)
    for n in range(5):
        client.submit(f"t{n}", request(f"/3/device/{n:02x}"), BODY)
    pump(client, server)
    assert client.capacity == 2
    assert sorted(server.requests) == [1, 3]
    answered: set[int] = set()
    while len(answered) < 5:
        server.answer(stream_id := min(set(server.requests) - answered))
        answered.add(stream_id)
        pump(client, server)
        assert client.open_streams <= 2
    paths = [dict(server.requests[s])[b":path"] for s in sorted(server.requests)]
    assert paths == [f"/3/device/{n:02x}".encode() for n in range(5)]


def test_our_own_limit_holds_below_the_servers() -> None:
    client, server = connected(max_streams=3, max_concurrent_streams=100)
    for n in range(10):
        client.submit(n, request(), BODY)
    pump(client, server)
    assert len(server.requests) == 3


def test_goaway_finishes_streams_up_to_its_last_id_and_returns_the_others() -> None:
    client, server = connected(max_streams=4)
    for n in range(6):
        client.submit(f"t{n}", request(), BODY)
    pump(client, server)
    assert sorted(server.requests) == [1, 3, 5, 7]
    server.h2.close_connection(last_stream_id=3, additional_data=b'{"reason":"Shutdown"}')
    events = pump(client, server)
    assert client.closing and not client.finished
    # Streams 5 and 7 and the two still queued were never processed.
    assert {(e.ticket, e.processed) for e in events} == {
        ("t2", False),
        ("t3", False),
        ("t4", False),
        ("t5", False),
    }
    assert 'GOAWAY (NO_ERROR: {"reason":"Shutdown"})' in {e.reason for e in events}
    # The answers to 1 and 3 still arrive, though h2 alone would call them errors.
    # (h2's server side closed itself on GOAWAY; the bytes of a server that goes on
    # answering are made with a second server connection's encoder.)
    answers = _answers_after_goaway(client, [1, 3])
    assert [(a.ticket, a.status) for a in answers] == [("t0", 200), ("t1", 200)]
    assert client.finished
    assert client.submit("late", request(), BODY) == [
        Unanswered("late", 'GOAWAY (NO_ERROR: {"reason":"Shutdown"})', processed=False)
    ]


def _answers_after_goaway(client: ClientConnection, stream_ids: list[int]) -> list:
    encoder = hpack.Encoder()
    events = []
    for stream_id in stream_ids:
        headers = HeadersFrame(stream_id, flags=["END_HEADERS"])
        headers.data = encoder.encode([(b":status", b"200")])
        data = DataFrame(stream_id, data=b"", flags=["END_STREAM"])
        events += client.receive(headers.serialize() + data.serialize())
    return events


@pytest.mark.parametrize(
    ("code", "processed"),
    [(h2.errors.ErrorCodes.REFUSED_STREAM, False), (h2.errors.ErrorCodes.INTERNAL_ERROR, True)],
)
def test_a_reset_stream(code: h2.errors.ErrorCodes, processed: bool) -> None:
    client, server = connected()
    client.submit("t", request(), BODY)
    pump(client, server)
    server.h2.reset_stream(1, code)
    [event] = pump(client, server)
    assert event == Unanswered("t", f"stream reset by APNs ({code.name})", processed)


def test_bodies_wait_for_the_flow_control_window() -> None:
    client, server = connected(initial_window_size=10)
    client.submit("t", request(), BODY)
    pump(client, server)
    # The server acknowledged each chunk as it came, so the whole body got through
    # in window-sized pieces.
    assert server.bodies[1] == BODY and 1 in server.ended


def test_received_data_is_acknowledged_so_the_window_never_runs_dry() -> None:
    client, server = connected()
    body = b"x" * 16000
    # 20 answers of 16 kB, five times the initial connection window: without
    # acknowledgements the server could not send the fifth (FlowControlError).
    for n in range(20):
        client.submit(n, request(), BODY)
        pump(client, server)
        server.answer(max(server.requests), 400, body)
        [answer] = pump(client, server)
        assert answer.body == body


def test_a_timed_out_request_is_reset_or_unqueued() -> None:
    client, server = connected(max_streams=1)
    client.submit("open", request(), BODY)
    client.submit("queued", request(), BODY)
    client.cancel("queued")
    client.cancel("open")
    pump(client, server)
    assert server.resets == {1: h2.errors.ErrorCodes.CANCEL}
    assert list(server.requests) == [1]  # the queued one never went out


def test_drain_returns_queued_requests_and_finishes_the_open_ones() -> None:
    client, server = connected(max_streams=1)
    client.submit("open", request(), BODY)
    client.submit("queued", request(), BODY)
    pump(client, server)
    assert client.drain() == [
        Unanswered("queued", "the connection was being replaced", processed=False)
    ]
    assert not client.finished
    server.answer(1)
    assert [e.ticket for e in pump(client, server)] == ["open"]
    assert client.finished


def test_a_lost_connection_returns_everything() -> None:
    client, server = connected(max_streams=1)
    client.submit("sent", request(), BODY)
    client.submit("queued", request(), BODY)
    pump(client, server)
    assert set(client.lost("ReadError: gone")) == {
        Unanswered("sent", "ReadError: gone", processed=True),
        Unanswered("queued", "ReadError: gone", processed=False),
    }


def test_ping() -> None:
    client, server = connected()
    client.ping()
    assert pump(client, server) == [PingAcked()]


def test_an_answer_without_a_valid_status_is_unanswered() -> None:
    client, server = connected()
    client.submit("t", request(), BODY)
    pump(client, server)
    server.h2.send_headers(1, [(b":status", b"2xx")], end_stream=True)
    assert pump(client, server) == [Unanswered("t", MALFORMED, processed=True)]


_frames = st.lists(
    st.tuples(
        st.integers(0, 10),  # DATA … CONTINUATION, and one type h2 does not know
        st.integers(0, 255),  # flags
        st.sampled_from([0, 1, 3, 5, 2**31 - 1]),  # connection, open streams, far away
        st.binary(max_size=40),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(_frames)
def test_whatever_apns_sends_is_an_event_or_a_protocol_error(
    frames: list[tuple[int, int, int, bytes]],
) -> None:
    # A rude server must end its connection, never the sender: the only exception
    # is h2's, which the sender's reader treats as a broken connection.
    client, server = connected()
    for ticket in range(3):
        client.submit(ticket, request(), BODY)
    pump(client, server)
    data = b"".join(
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
        for kind, flags, stream, payload in frames
    )
    try:
        events = client.receive(data)
    except h2.exceptions.ProtocolError:
        return
    assert all(isinstance(e, Answered | Unanswered | PingAcked) for e in events)
    client.data_to_send()
