"""One HTTP/2 client connection, without I/O: requests in, frames and answers out.

The sender (`sender.py`) feeds it the bytes read from the socket and writes
what `data_to_send` returns; everything HTTP/2 asks of a client that APNs relies
on is decided here, so it is tested without sockets:

- at most `min(max_streams, the server's SETTINGS_MAX_CONCURRENT_STREAMS)`
  streams are open; further requests wait in order, and no request starts before
  the server's SETTINGS arrived (before that, its limit is unknown);
- request bodies respect the flow-control windows, and received data is
  acknowledged, so neither side's window runs dry on a connection kept for days;
- GOAWAY: streams up to its last stream id finish normally; those above it, and
  those reset with REFUSED_STREAM, were never processed (RFC 9113 §6.8, §8.7),
  so they come back as `Unanswered(processed=False)`: safe to send elsewhere.

Requests are named by a ticket the caller chooses; answers carry it back.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
from h2.settings import SettingCodes

if TYPE_CHECKING:
    from hyperframe.frame import GoAwayFrame

Headers = list[tuple[bytes, bytes]]

# Stream ids are 31 bits and never reused: a connection that used them up is
# replaced (about four days at 5,000 pushes/s).
LAST_STREAM_ID = 2**31 - 1
MALFORMED = "APNs answered without a valid :status"


@attrs.frozen
class Answered:
    ticket: Hashable
    status: int
    headers: Headers
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key == name), None)


@attrs.frozen
class Unanswered:
    ticket: Hashable
    reason: str
    # False: the server never acted on it (not sent, refused, above GOAWAY's last
    # stream id): sending it again cannot duplicate it.
    processed: bool


@attrs.frozen
class PingAcked:
    pass


Event = Answered | Unanswered | PingAcked


@attrs.define(slots=True)
class _Stream:
    ticket: Hashable
    body: bytes  # the part not yet sent (flow control)
    status: int | None = None
    headers: Headers = attrs.field(factory=list)
    received: bytearray = attrs.field(factory=bytearray)


class _H2Connection(h2.connection.H2Connection):
    """h2, but a GOAWAY does not end the streams the server still answers.

    h2 moves the whole connection to CLOSED on GOAWAY, so the answers to streams at
    or below its last stream id would be protocol errors and their pushes resent:
    duplicates. Here GOAWAY is reported and the connection stays open; this class
    never opens a stream after one (`ClientConnection` sees to that).
    """

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list, list]:
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = h2.errors.ErrorCodes(frame.error_code)
        except ValueError:  # a code RFC 9113 does not define: keep the number
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    # Our own headers are built from checked parts (hex tokens, known names), and of
    # APNs's only :status and apns-id are read, :status checked here: h2's checks of
    # every header, both ways, were a tenth of the cost of a push.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
)


class ClientConnection:
    def __init__(self, max_streams: int) -> None:
        self._max_streams = max_streams
        self._h2 = _H2Connection(config=_CONFIG)
        self._h2.initiate_connection()
        self._streams: dict[int, _Stream] = {}
        self._ids: dict[Hashable, int] = {}
        self._queue: deque[tuple[Hashable, Headers, bytes]] = deque()
        self._blocked: set[int] = set()  # streams whose body waits for window
        self._settled = False  # the server's SETTINGS arrived
        self._last_stream_id: int | None = None  # from GOAWAY
        self._draining = False  # we stop opening streams
        self.goaway_reason = ""

    # --- asking -------------------------------------------------------------------

    def submit(self, ticket: Hashable, headers: Headers, body: bytes) -> list[Event]:
        """Send a request now if a stream is free, else when one is."""
        if self.closing:
            return [Unanswered(ticket, self._closing_reason(), processed=False)]
        self._queue.append((ticket, headers, body))
        self._start_queued()
        return []

    def cancel(self, ticket: Hashable) -> None:
        """Give up on a request (timed out): reset its stream, or drop it from the queue."""
        stream_id = self._ids.pop(ticket, None)
        if stream_id is None:
            self._queue = deque(item for item in self._queue if item[0] != ticket)
            return
        del self._streams[stream_id]
        self._blocked.discard(stream_id)
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        self._start_queued()

    def ping(self, opaque: bytes = b"dovenoti") -> None:
        self._h2.ping(opaque)

    def drain(self) -> list[Event]:
        """Open no more streams; the open ones finish. Queued requests come back."""
        self._draining = True
        return self._unqueue("the connection was being replaced")

    def lost(self, reason: str) -> list[Event]:
        """The connection is gone: every request still waiting comes back."""
        events = self._unqueue(reason)
        events += [Unanswered(s.ticket, reason, processed=True) for s in self._streams.values()]
        self._streams.clear()
        self._ids.clear()
        return events

    # --- hearing ------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """What the server's bytes mean; h2.exceptions.ProtocolError if they are wrong."""
        events: list[Event] = []
        for event in self._h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.headers = event.headers
                    stream.status = _status(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                if (stream := self._streams.get(event.stream_id)) is not None:
                    stream.received += event.data
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if (stream := self._forget(event.stream_id)) is None:
                    pass
                elif stream.status is None:
                    events.append(Unanswered(stream.ticket, MALFORMED, processed=True))
                else:
                    events.append(
                        Answered(
                            stream.ticket, stream.status, stream.headers, bytes(stream.received)
                        )
                    )
            elif isinstance(event, h2.events.StreamReset):
                if (stream := self._forget(event.stream_id)) is not None:
                    code = event.error_code
                    refused = code == h2.errors.ErrorCodes.REFUSED_STREAM
                    name = getattr(code, "name", str(code))
                    events.append(
                        Unanswered(stream.ticket, f"stream reset by APNs ({name})", not refused)
                    )
            elif isinstance(event, h2.events.ConnectionTerminated):
                events += self._goaway(event)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                self._settled = True
                if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                    self._unblock()
            elif isinstance(event, h2.events.WindowUpdated):
                self._unblock()
            elif isinstance(event, h2.events.PingAckReceived):
                events.append(PingAcked())
        self._start_queued()
        return events

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    # --- state --------------------------------------------------------------------

    @property
    def settled(self) -> bool:
        """The server's SETTINGS arrived: its stream limit is known."""
        return self._settled

    @property
    def closing(self) -> bool:
        """No new stream will open on this connection."""
        return self._last_stream_id is not None or self._draining

    @property
    def finished(self) -> bool:
        """Closing and nothing left open: the connection can go."""
        return self.closing and not self._streams

    @property
    def capacity(self) -> int:
        return min(self._max_streams, self._h2.remote_settings.max_concurrent_streams)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # --- inside ---------------------------------------------------------------------

    def _start_queued(self) -> None:
        if not self._settled:
            return
        capacity = self.capacity
        while self._queue and len(self._streams) < capacity and not self.closing:
            ticket, headers, body = self._queue.popleft()
            stream_id = self._h2.get_next_available_stream_id()
            if stream_id >= LAST_STREAM_ID - 2:
                self._draining = True
            self._h2.send_headers(stream_id, headers)
            self._streams[stream_id] = _Stream(ticket, body)
            self._ids[ticket] = stream_id
            self._send_body(stream_id)

    def _send_body(self, stream_id: int) -> None:
        stream = self._streams[stream_id]
        while True:
            size = min(
                len(stream.body),
                self._h2.local_flow_control_window(stream_id),
                self._h2.max_outbound_frame_size,
            )
            if size <= 0 and stream.body:
                self._blocked.add(stream_id)
                return
            chunk, stream.body = stream.body[:size], stream.body[size:]
            self._h2.send_data(stream_id, chunk, end_stream=not stream.body)
            if not stream.body:
                self._blocked.discard(stream_id)
                return

    def _unblock(self) -> None:
        for stream_id in sorted(self._blocked):
            if stream_id in self._streams:
                self._send_body(stream_id)

    def _forget(self, stream_id: int) -> _Stream | None:
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            del self._ids[stream.ticket]
            self._blocked.discard(stream_id)
        return stream

    def _goaway(self, event: h2.events.ConnectionTerminated) -> list[Event]:
        last = event.last_stream_id
        # A server may send several GOAWAYs, each with a lower or equal last stream id.
        if self._last_stream_id is not None:
            last = min(last, self._last_stream_id)
        self._last_stream_id = last
        code = getattr(event.error_code, "name", str(event.error_code))
        debug = (event.additional_data or b"").decode("utf-8", "replace")
        self.goaway_reason = f"GOAWAY ({code}{': ' + debug if debug else ''})"
        events = self._unqueue(self.goaway_reason)
        for stream_id in [s for s in self._streams if s > last]:
            stream = self._forget(stream_id)
            assert stream is not None
            events.append(Unanswered(stream.ticket, self.goaway_reason, processed=False))
        return events

    def _unqueue(self, reason: str) -> list[Event]:
        events: list[Event] = [
            Unanswered(ticket, reason, processed=False) for ticket, _, _ in self._queue
        ]
        self._queue.clear()
        return events

    def _closing_reason(self) -> str:
        return self.goaway_reason or "the connection was being replaced"


def _status(headers: Headers) -> int | None:
    for name, value in headers:
        if name == b":status":
            return int(value) if len(value) == 3 and value.isdigit() else None
    return None
