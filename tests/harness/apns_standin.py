"""An APNs stand-in: real HTTP/2 over mutual TLS, on 127.0.0.1, in the test's trio loop.

hypercorn (trio worker, in-process) serves a small ASGI app that records every
request and answers from a queue or a responder function. The TLS handshake
requires a client certificate issued by the test PKI's client CA, like APNs.

Tests await `standin.next_request()` instead of sleeping. A separate process (the
dovenotify service in end-to-end tests) reaches it at `standin.url`, trusting
`standin.ca_file`, with a client certificate from `test_pki.client`.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h2.connection
import h2.events
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from hypercorn.config import Config
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.trio import serve
from hyperframe.frame import GoAwayFrame

from dovenotify.apns.token import verify_token
from tests.harness.certs import Pki


class _GoawayAsApnsSendsIt(h2.connection.H2Connection):
    """GOAWAY that lets the streams up to its last stream id finish.

    h2 closes the whole connection when it sends GOAWAY, so hypercorn could not
    answer the requests it had accepted, and the client would see them lost. APNs
    answers them; requests on later streams are never processed (RFC 9113 §6.8):
    the stand-in ignores them (`_handle_events` below).
    """

    goaway_last_stream_id: int | None = None
    # The request being handled: the last one accepted when it triggers GOAWAY
    # (h2's highest_inbound_stream_id already counts every request read with it).
    handling_stream_id = 0

    def close_connection(
        self,
        error_code: int = 0,
        additional_data: bytes | None = None,
        last_stream_id: int | None = None,
    ) -> None:
        if self.goaway_last_stream_id is not None:
            return
        if last_stream_id is None:
            last_stream_id = self.handling_stream_id or self.highest_inbound_stream_id
        self.goaway_last_stream_id = last_stream_id
        frame = GoAwayFrame(
            stream_id=0,
            last_stream_id=last_stream_id,
            error_code=error_code,
            additional_data=additional_data or b"",
        )
        self._prepare_for_sending([frame])


def _patch_hypercorn() -> None:
    """hypercorn 0.18, made to behave like APNs where it matters to the sender.

    GOAWAY: see `_GoawayAsApnsSendsIt`; events for streams above its last stream
    id are dropped. And clients dying mid-request: when a client dies (kill -9)
    with a request's HEADERS and DATA still unread, hypercorn closes the streams
    while handling the HEADERS, then fails on the DATA with KeyError, which stops
    the whole server rather than that connection. Events for streams that are
    gone are dropped, one event at a time, so each is checked when its turn comes.
    """
    init = H2Protocol.__init__
    handle = H2Protocol._handle_events
    for_a_stream = (h2.events.RequestReceived, h2.events.DataReceived, h2.events.StreamEnded)

    def __init__(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.connection.__class__ = _GoawayAsApnsSendsIt

    async def handle_events(self: H2Protocol, events: list[h2.events.Event]) -> None:
        for event in events:
            if isinstance(event, for_a_stream):
                last = self.connection.goaway_last_stream_id
                if last is not None and event.stream_id > last:
                    if isinstance(event, h2.events.DataReceived):
                        self.connection.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    continue
                if isinstance(event, h2.events.RequestReceived):
                    self.connection.handling_stream_id = event.stream_id
                elif event.stream_id not in self.streams:
                    continue
            await handle(self, [event])

    H2Protocol.__init__ = __init__  # type: ignore[method-assign]
    H2Protocol._handle_events = handle_events  # type: ignore[method-assign]


_patch_hypercorn()


@attrs.frozen
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; HTTP/2 pseudo-headers are not included
    body: bytes
    http_version: str  # "2" when the client spoke HTTP/2
    client: tuple[str, int] | None

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Answer:
    status: int = 200
    # dict: sent as JSON; bytes: sent as is (e.g. malformed JSON); None: empty body.
    body: dict[str, Any] | bytes | None = None
    # Never answer; the request stays open until the client gives up or the stand-in stops.
    hang: bool = False


HANG = Answer(hang=True)

AnswerLike = Answer | tuple[int, dict[str, Any] | bytes | None]
Responder = Callable[[RecordedRequest], AnswerLike | Awaitable[AnswerLike]]


def _delivered(_request: RecordedRequest) -> AnswerLike:
    return Answer(200)


@attrs.define(eq=False)
class ApnsStandin:
    url: str  # https://127.0.0.1:PORT
    ca_file: Path  # trust this for the stand-in's server certificate
    requests: list[RecordedRequest] = attrs.field(factory=list)
    # Client certificates from completed handshakes, in order (the ASGI scope does not
    # carry them, so they are caught at the TLS layer).
    peer_certificates: list[x509.Certificate] = attrs.field(factory=list)
    # Answers used in order, one per request; then `responder` answers.
    answers: deque[AnswerLike] = attrs.field(factory=deque)
    responder: Responder = _delivered
    # Token authentication: verify each request's bearer token against this key, as
    # APNs does, and answer 403 when it is missing or wrong.
    token_key: ec.EllipticCurvePublicKey | None = None
    # (header, claims) of every valid token seen.
    tokens: list[tuple[dict[str, Any], dict[str, Any]]] = attrs.field(factory=list)
    _cancel_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _arrivals: tuple[
        trio.MemorySendChannel[RecordedRequest], trio.MemoryReceiveChannel[RecordedRequest]
    ] = attrs.field(factory=lambda: trio.open_memory_channel(math.inf))

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def queue_answers(self, *answers: AnswerLike) -> None:
        self.answers.extend(answers)

    async def next_request(self, timeout: float = 10) -> RecordedRequest:
        """The next request not yet taken, waiting up to `timeout` seconds for it."""
        with trio.fail_after(timeout):
            return await self._arrivals[1].receive()

    def abort(self) -> None:
        """Stop now, dropping every connection without GOAWAY, as a crash would."""
        self._cancel_scope.cancel()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        headers = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]
        }
        request = RecordedRequest(
            method=scope["method"],
            path=scope["path"],
            headers=headers,
            body=body,
            http_version=scope["http_version"],
            client=tuple(scope["client"]) if scope.get("client") else None,
        )
        self.requests.append(request)
        self._arrivals[0].send_nowait(request)

        answer = self._check_token(request) or await self._answer_for(request)
        if answer.hang:
            await trio.sleep_forever()
        if isinstance(answer.body, dict):
            payload = json.dumps(answer.body).encode()
        else:
            payload = answer.body or b""
        response_headers = [
            (b"apns-id", headers.get("apns-id", str(uuid.uuid4()).upper()).encode())
        ]
        if payload:
            response_headers.append((b"content-type", b"application/json"))
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": payload})

    def _check_token(self, request: RecordedRequest) -> Answer | None:
        if self.token_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return Answer(403, {"reason": "MissingProviderToken"})
        try:
            self.tokens.append(verify_token(token, self.token_key))
        except ValueError:
            return Answer(403, {"reason": "InvalidProviderToken"})
        return None

    async def _answer_for(self, request: RecordedRequest) -> Answer:
        answer = self.answers.popleft() if self.answers else self.responder(request)
        if not isinstance(answer, Answer | tuple):
            answer = await answer
        if isinstance(answer, tuple):
            answer = Answer(*answer)
        return answer


@asynccontextmanager
async def run_apns_standin(
    pki: Pki,
    *,
    answers: tuple[AnswerLike, ...] = (),
    responder: Responder = _delivered,
    keep_alive_timeout: float = 5,
    keep_alive_max_requests: int = 1000,
    max_concurrent_streams: int = 100,
    port: int = 0,
    token_key: ec.EllipticCurvePublicKey | None = None,
) -> AsyncIterator[ApnsStandin]:
    """Serve the stand-in until the block ends; answers come from `answers`, then `responder`.

    `port` 0 picks a free one; give a previous stand-in's port to play a restarted APNs.
    After `keep_alive_max_requests` requests on a connection it sends GOAWAY, as
    APNs does: the requests it has accepted are answered, later ones ignored. It
    allows `max_concurrent_streams` per connection (its SETTINGS say so). With
    `token_key` it wants token authentication instead of a client certificate.
    """
    config = _StandinConfig()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile = str(pki.server_cert)
    config.keyfile = str(pki.server_key)
    if token_key is None:
        config.ca_certs = str(pki.client_ca_file)
        config.verify_mode = ssl.VerifyMode.CERT_REQUIRED
    config.keep_alive_timeout = keep_alive_timeout
    config.keep_alive_max_requests = keep_alive_max_requests
    config.h2_max_concurrent_streams = max_concurrent_streams
    config.graceful_timeout = 1
    # To pytest's log capture rather than stderr: some tests fail handshakes on purpose.
    config.errorlog = logging.getLogger("tests.apns_standin")

    standin = ApnsStandin(url="", ca_file=pki.ca_file, responder=responder, token_key=token_key)
    standin.answers.extend(answers)
    config.on_handshake = lambda der: standin.peer_certificates.append(
        x509.load_der_x509_certificate(der)
    )

    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[list[str]]) -> None:
            with standin._cancel_scope:
                await serve(standin._app, config, task_status=task_status, mode="asgi")

        binds = await nursery.start(run)
        standin.url = binds[0]
        try:
            yield standin
        finally:
            standin.abort()


@pytest.fixture
async def apns_standin(test_pki: Pki) -> AsyncIterator[ApnsStandin]:
    """A running stand-in answering 200 unless told otherwise (`queue_answers`, `responder`)."""
    async with run_apns_standin(test_pki) as standin:
        yield standin


class _StandinConfig(Config):
    """hypercorn's TLS context, plus a record of each client certificate presented."""

    on_handshake: Callable[[bytes], None] | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        if context is not None and self.on_handshake is not None:
            on_handshake = self.on_handshake

            # trio's SSLStream drives an SSLObject made from the context's class.
            class RecordingSSLObject(ssl.SSLObject):
                def do_handshake(self) -> None:
                    super().do_handshake()
                    der = self.getpeercert(binary_form=True)
                    if der:
                        on_handshake(der)

            context.sslobject_class = RecordingSSLObject
        return context
