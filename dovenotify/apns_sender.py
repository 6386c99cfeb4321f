"""Send pushes to APNs over one long-lived HTTP/2 connection (httpx + h2, under trio).

`send` never raises for network trouble: APNs closes connections (GOAWAY, idle
close) and httpx does not retry requests that were in flight when that happened,
so every such failure comes back as a retry Outcome for the caller's backoff.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import h2.exceptions
import httpx
import trio

from dovenotify import __version__
from dovenotify.apns import (
    PRODUCTION,
    Action,
    Outcome,
    Push,
    build_request,
    classify,
    transport_failure,
)
from dovenotify.apns_token import TokenSigner
from dovenotify.certificates import Credentials, client_ssl_context

# httpx caps a connection at 100 concurrent streams and can fail with "Max outbound
# streams" when it is reached around a reconnect; stay well below it.
DEFAULT_MAX_IN_FLIGHT = 64

_FAILURES = (
    httpx.TransportError,  # timeouts, connect/read/write errors, protocol errors
    h2.exceptions.ProtocolError,  # should be wrapped by httpcore; in case one slips through
    ssl.SSLError,
    OSError,
    trio.BrokenResourceError,
)

# TLS alerts by which a server refuses the client certificate (OpenSSL's names).
_CERTIFICATE_ALERTS = (
    "ALERT_BAD_CERTIFICATE",
    "ALERT_UNKNOWN_CA",
    "ALERT_CERTIFICATE_",  # _EXPIRED, _REVOKED, _UNKNOWN, _UNSUPPORTED, _REQUIRED
    "ALERT_ACCESS_DENIED",
    "ALERT_HANDSHAKE_FAILURE",
)


class ApnsSender:
    def __init__(
        self,
        credentials: Credentials | None,
        *,
        token: TokenSigner | None = None,
        endpoint: str = PRODUCTION,
        ca_file: Path | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        timeout: float = 10,
        idle_expiry: float = 1800,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.endpoint = endpoint.rstrip("/")
        self._clock = clock
        self._token = token
        self._limiter = trio.CapacityLimiter(max_in_flight)
        self._client = httpx.AsyncClient(
            http1=False,
            http2=True,
            verify=client_ssl_context(credentials, ca_file),
            base_url=self.endpoint,
            timeout=httpx.Timeout(timeout),
            # One connection, kept open while idle (httpx's default drops it after 5 s):
            # APNs treats rapid reconnects as abuse.
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=idle_expiry
            ),
            headers={"user-agent": f"dovenotify/{__version__}"},
        )

    async def send(self, push: Push) -> Outcome:
        """Send one push; the Outcome says what to do with the registration."""
        request = build_request(push, self._clock())
        async with self._limiter:
            for attempt in range(2):
                headers = request.headers
                if self._token is not None:
                    headers = {**headers, "authorization": f"bearer {self._token.token()}"}
                try:
                    response = await self._client.post(
                        request.path, headers=headers, content=request.body
                    )
                except (httpx.TimeoutException, httpx.ConnectError) as error:
                    # A fresh connection was just tried, or waiting longer would not help.
                    return _refused_certificate(error) or transport_failure(_describe(error))
                except _FAILURES as error:
                    # httpcore does not watch idle HTTP/2 connections: one the server
                    # closed (GOAWAY, idle timeout) is only found dead by the next request
                    # written to it. One immediate attempt on a new connection covers
                    # that; a duplicate push, should the first have arrived, is harmless.
                    if attempt:
                        return transport_failure(_describe(error))
                    continue
                outcome = classify(
                    response.status_code, response.content, response.headers.get("apns-id")
                )
                if attempt or not self._renewed_token(outcome):
                    return outcome
        return outcome

    def _renewed_token(self, outcome: Outcome) -> bool:
        return (
            self._token is not None
            and outcome.action is Action.CONFIG_ERROR
            and outcome.reason == "ExpiredProviderToken"
            and self._token.expired()
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> ApnsSender:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _refused_certificate(error: BaseException) -> Outcome | None:
    """APNs refused our client certificate in the TLS handshake: not worth retrying."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, ssl.SSLCertVerificationError):
            text = str(cause)
            if any(alert in text for alert in _CERTIFICATE_ALERTS):
                return Outcome(
                    Action.CONFIG_ERROR,
                    None,
                    f"APNs refused our client certificate in the TLS handshake ({text})",
                )
        cause = cause.__cause__ or cause.__context__
    return None


def _describe(error: BaseException) -> str:
    detail = str(error) or repr(error)
    return f"{type(error).__name__}: {detail}"
