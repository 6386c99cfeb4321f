"""APNs delivery when APNs misbehaves, on the whole real path.

Each test runs Dovecot, `dovenotify serve` and the HTTP/2 mutual-TLS APNs stand-in
(tests/harness/stack.py); iPhones register over IMAP, mail arrives over LMTP, and
the test plays APNs: every answer class, outages, GOAWAY, idle closes, hung
streams, a TLS black hole, a refused certificate and token authentication.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.harness.apns_standin import HANG, Answer, RecordedRequest, run_apns_standin
from tests.harness.certs import Pki
from tests.harness.dovecot import deliver, free_ports
from tests.harness.service import dovenotify_command
from tests.harness.stack import Stack, run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
# Made-up tokens, one per simulated iPhone.
TOKENS = [f"{n:02x}" * 32 for n in range(0xA0, 0xAA)]
SHUTDOWN_WITHOUT_LOSS = 10.0


def token_of(request: RecordedRequest) -> str:
    return request.path.rsplit("/", 1)[1]


def apns_settings(pki: Pki, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "certificate": str(pki.client.combined_pem),
        "endpoint": f"https://127.0.0.1:{port}",
        "ca_file": str(pki.ca_file),
        **extra,
    }


async def register(stack: Stack, *tokens: str, user: str = "alice") -> None:
    """Each token registers as its own iPhone, over IMAP as iOS Mail does."""
    for token in tokens:
        phone = await stack.iphone(user)
        assert (await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])).ok
        await phone.logout()


async def new_mail(stack: Stack, user: str = "alice") -> None:
    await trio.to_thread.run_sync(
        lambda: deliver(stack.dovecot, user, b"Subject: hi\r\n\r\nhello\r\n")
    )


async def devices(stack: Stack) -> dict[str, dict[str, Any]]:
    """`dovenotify devices --json`, by device token."""
    result = await trio.run_process(
        [*dovenotify_command(), "devices", "--json", "--config", str(stack.service.config_path)],
        capture_stdout=True,
    )
    return {d["device_token"]: d for d in json.loads(result.stdout)}


async def until(
    check: Callable[[], Any], what: str, timeout: float = 10, stack: Stack | None = None
) -> None:
    """Wait for state another process changes (its log, its database)."""
    with trio.move_on_after(timeout):
        while not check():
            await trio.sleep(0.02)
        return
    log = f"; the service's log:\n{stack.service.log_text()[-4000:]}" if stack else ""
    raise AssertionError(f"timed out waiting for {what}{log}")


async def log_says(stack: Stack, text: str, timeout: float = 10) -> None:
    await until(lambda: text in stack.service.log_text(), repr(text), timeout, stack)


async def drained(stack: Stack) -> None:
    """Stop the service: SIGTERM pushes everything pending first, so afterwards the
    stand-in has seen every request the service was ever going to make."""
    with trio.fail_after(SHUTDOWN_WITHOUT_LOSS):
        assert await stack.service.stop() == 0


# --- answers -------------------------------------------------------------------------


async def test_delivered(test_pki: Pki) -> None:
    async with run_stack(test_pki, version=None) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        assert token_of(await stack.standin.next_request()) == TOKENS[0]
        await until(lambda: "delivered" in stack.service.log_text(), "the push to be recorded")
        device = (await devices(stack))[TOKENS[0]]
        assert device["last_push_result"] == "delivered"


async def test_410_removes_only_registrations_older_than_its_timestamp(test_pki: Pki) -> None:
    old, renewed = TOKENS[0], TOKENS[1]

    def answer(request: RecordedRequest) -> Answer:
        registered = registered_at[token_of(request)]
        # For `old`, APNs learnt of the dead token after it registered; `renewed`
        # registered again after APNs's timestamp, so that registration is live.
        offset = 60 if token_of(request) == old else -60
        return Answer(
            410, {"reason": "Unregistered", "timestamp": int((registered + offset) * 1000)}
        )

    async with run_stack(test_pki, version=None, responder=answer) as stack:
        await register(stack, old, renewed)
        registered_at = {
            token: _epoch(d["registered_at"]) for token, d in (await devices(stack)).items()
        }
        await new_mail(stack)
        await log_says(stack, f"removed alice device {old[:8]}")
        await until(lambda: stack.standin.requests and len(stack.standin.requests) == 2, "pushes")
        await drained(stack)
        remaining = await devices(stack)
    assert list(remaining) == [renewed]
    assert remaining[renewed]["last_push_result"] == "drop_token (410 Unregistered)"


async def test_bad_device_token_removes_the_registration(test_pki: Pki) -> None:
    answers = (Answer(400, {"reason": "BadDeviceToken"}),)
    async with run_stack(test_pki, version=None, answers=answers) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        await log_says(stack, "APNs says BadDeviceToken")
        assert await devices(stack) == {}


async def test_device_token_not_for_topic_is_marked_and_not_pushed_again(test_pki: Pki) -> None:
    stale, fine = TOKENS[0], TOKENS[1]

    def answer(request: RecordedRequest) -> Answer:
        if token_of(request) == stale:
            return Answer(400, {"reason": "DeviceTokenNotForTopic"})
        return Answer(200)

    async with run_stack(test_pki, version=None, responder=answer) as stack:
        await register(stack, stale, fine)
        await new_mail(stack)
        await log_says(stack, "no more pushes to it until the device registers again")
        await new_mail(stack)
        await until(lambda: len(stack.standin.requests) == 3, "the second mail's push")
        await drained(stack)
        listed = await devices(stack)
        pushed = Counter(token_of(r) for r in stack.standin.requests)
    assert pushed == {stale: 1, fine: 2}
    # Kept, and `dovenotify devices` says why it gets no pushes.
    assert listed[stale]["last_push_result"] == "token_not_for_topic (400 DeviceTokenNotForTopic)"


async def test_429_backs_off_that_token_only(test_pki: Pki) -> None:
    limited, other = TOKENS[0], TOKENS[1]
    seen: dict[str, list[float]] = {limited: [], other: []}

    def answer(request: RecordedRequest) -> Answer:
        times = seen[token_of(request)]
        times.append(trio.current_time())
        if token_of(request) == limited and len(times) == 1:
            return Answer(429, {"reason": "TooManyRequests"})
        return Answer(200)

    async with run_stack(test_pki, version=None, responder=answer) as stack:
        await register(stack, limited, other)
        await new_mail(stack)
        await log_says(stack, f"push to alice device {limited[:8]}… will be retried")
        await until(lambda: len(seen[limited]) == 2, "the retry")
        await drained(stack)
    # The first backoff is 0.5 to 1.5 s (1 s, jittered); the other device did not wait.
    assert seen[limited][1] - seen[limited][0] >= 0.5
    assert len(seen[other]) == 1


async def test_certificate_refused_pauses_sending_until_reload(
    test_pki: Pki, tmp_path: Path
) -> None:
    certificate = tmp_path / "push.pem"
    shutil.copyfile(test_pki.client.combined_pem, certificate)
    (port,) = free_ports(1)
    settings = {"apns": apns_settings(test_pki, port, certificate=str(certificate))}
    renewed_subject: list[object] = []

    def answer(request: RecordedRequest) -> Answer:
        # Apple refuses the old certificate; the renewed one works.
        presented = stack.standin.peer_certificates[-1].public_key().public_numbers()
        if presented in renewed_subject:
            return Answer(200)
        return Answer(403, {"reason": "BadCertificate"})

    async with run_stack(test_pki, settings, version=None, port=port, responder=answer) as stack:
        await register(stack, *TOKENS[:3])
        await new_mail(stack)
        await log_says(stack, "Sending is paused")
        refused = len(stack.standin.requests)
        # More mail while paused: kept, not sent, no retry storm.
        await new_mail(stack)
        await new_mail(stack)
        await log_says(stack, "device a0a0a0a0… now", timeout=5)
        await trio.sleep(1.0)  # several backoff periods: nothing may be sent in them
        assert len(stack.standin.requests) == refused <= 3
        assert stack.service.log_text().count("Sending is paused") == 1

        # The admin puts the renewed certificate in place and reloads.
        shutil.copyfile(test_pki.client_renewed.combined_pem, certificate)
        renewed_subject.append(_public_numbers(test_pki.client_renewed.combined_pem))
        stack.service.process.send_signal(signal.SIGHUP)
        await log_says(stack, "reloaded: now using certificate")
        await until(
            lambda: {token_of(r) for r in stack.standin.requests[refused:]} == set(TOKENS[:3]),
            "every device to be pushed after the reload",
        )
        await drained(stack)
        after = Counter(token_of(r) for r in stack.standin.requests[refused:])
    # Three mails, one pending push per device: each device exactly once.
    assert after == {token: 1 for token in TOKENS[:3]}


async def test_503_for_a_while_then_every_device_pushed_once(test_pki: Pki) -> None:
    outage: Counter[str] = Counter()

    def answer(request: RecordedRequest) -> Answer:
        # APNs as a whole is unavailable for its first ten answers, whichever
        # devices they are for: one outage, as the log should tell it.
        if outage.total() < 10:
            outage[token_of(request)] += 1
            return Answer(503, {"reason": "ServiceUnavailable"})
        return Answer(200)

    async with run_stack(test_pki, version=None, responder=answer) as stack:
        await register(stack, *TOKENS[:5])
        await new_mail(stack)
        await new_mail(stack)  # coalesced with the pending retry
        await until(lambda: len(stack.standin.requests) >= 15, "recovery", timeout=20)
        await drained(stack)
        log = stack.service.log_text()
    assert "gave up" not in log
    # The outage is told once, and its end once: not per device or retry.
    assert log.count("WARNING dovenotify: APNs answers 503 ServiceUnavailable;") == 1
    assert log.count("APNs answers normally again") == 1
    delivered = Counter(token_of(r) for r in stack.standin.requests) - outage
    assert delivered == {token: 1 for token in TOKENS[:5]}


async def test_gives_up_at_retry_deadline_with_one_line(test_pki: Pki) -> None:
    unavailable = Answer(503, {"reason": "ServiceUnavailable"})
    async with run_stack(
        test_pki, {"retry_deadline": 2}, version=None, responder=lambda _r: unavailable
    ) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        await log_says(stack, f"gave up pushing to alice device {TOKENS[0][:8]}")
        tried = len(stack.standin.requests)
        await drained(stack)
        log = stack.service.log_text()
    # Backoffs of 0.5-1.5 s, 1-3 s, 2-6 s: the 2 s deadline is met after two to four
    # attempts of the device's own; the outage's probes (APNs as a whole fails) go
    # at their own pace and add up to two (seen: 5 in about 1 run of 4). Nothing is
    # tried after giving up.
    assert 2 <= tried == len(stack.standin.requests) <= 6
    assert log.count("gave up pushing") == 1


# --- connections ---------------------------------------------------------------------


async def test_goaway_with_requests_in_flight_loses_no_push(test_pki: Pki) -> None:
    async def slow(_request: RecordedRequest) -> Answer:
        await trio.sleep(0.05)  # keep the streams open when GOAWAY comes
        return Answer(200)

    # The stand-in sends GOAWAY on a connection's 13th request: the first mail's ten
    # pushes fit, the second mail's ten are in flight when it comes. As APNs does,
    # it answers the requests up to GOAWAY's last stream id and ignores the rest;
    # the sender waits for the former and sends the latter on a new connection.
    async with run_stack(
        test_pki, version=None, responder=slow, keep_alive_max_requests=12
    ) as stack:
        await register(stack, *TOKENS)
        await new_mail(stack)
        await until(lambda: len(stack.standin.requests) == 10, "the first mail's pushes")
        first_connection = {r.client for r in stack.standin.requests}
        await new_mail(stack)
        await until(
            lambda: len(stack.standin.requests) == 20, "the second mail's pushes", stack=stack
        )
        await drained(stack)
        log = stack.service.log_text()
    assert len(first_connection) == 1
    assert Counter(r.client for r in stack.standin.requests).most_common(1)[0][1] == 13
    assert "gave up" not in log
    assert "unsent" not in log
    # One push per device and mail: none lost, none twice.
    assert Counter(token_of(r) for r in stack.standin.requests) == {token: 2 for token in TOKENS}


async def test_connection_closed_while_idle_loses_no_push(test_pki: Pki) -> None:
    async with run_stack(test_pki, version=None, keep_alive_timeout=0.2) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        first = await stack.standin.next_request()
        await trio.sleep(0.5)  # idle past the server's keep-alive timeout: it closes
        await new_mail(stack)
        second = await stack.standin.next_request()
        await drained(stack)
        assert "will be retried" not in stack.service.log_text()
    assert second.client != first.client
    assert len(stack.standin.requests) == 2


async def test_hung_stream_times_out_and_is_retried(test_pki: Pki) -> None:
    (port,) = free_ports(1)
    settings = {"apns": apns_settings(test_pki, port, timeout=0.5)}
    async with run_stack(test_pki, settings, version=None, port=port, answers=(HANG,)) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        await stack.standin.next_request()
        await log_says(stack, "will be retried: retry (ReadTimeout")
        retried = await stack.standin.next_request(timeout=5)
        await drained(stack)
    assert token_of(retried) == TOKENS[0]


@pytest.mark.parametrize(
    ("host", "cause"),
    [
        ("127.0.0.1", "ConnectError: 127.0.0.1 port {port} refused the connection"),
        ("apns.invalid", "ConnectError: DNS lookup of apns.invalid failed ("),
    ],
)
async def test_the_log_says_why_apns_cannot_be_reached(
    test_pki: Pki, host: str, cause: str
) -> None:
    """Nothing listens, or the name does not resolve: the warning names which."""
    (port,) = free_ports(1)
    apns = {**apns_settings(test_pki, port, timeout=0.5), "endpoint": f"https://{host}:{port}"}
    async with run_stack(test_pki, {"apns": apns}, version=None) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        await log_says(
            stack, f"WARNING dovenotify: APNs cannot be reached ({cause.format(port=port)}"
        )


async def test_tls_black_hole_then_apns_comes_back(test_pki: Pki) -> None:
    """A listener that accepts TCP and never says a word of TLS."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    settings = {"apns": apns_settings(test_pki, port, timeout=0.5)}
    async with run_stack(test_pki, settings, version=None) as stack:
        async with trio.open_nursery() as nursery:
            accepted: list[trio.SocketStream] = []

            async def swallow() -> None:
                while True:
                    accepted.append(await listeners[0].accept())

            nursery.start_soon(swallow)
            await register(stack, TOKENS[0])
            await new_mail(stack)
            await log_says(stack, "will be retried: retry (ConnectTimeout")
            assert "WARNING dovenotify: APNs cannot be reached (ConnectTimeout)" in (
                stack.service.log_text()
            )
            nursery.cancel_scope.cancel()
        for stream in [*accepted, *listeners]:
            await stream.aclose()
        # The black hole is gone; APNs answers on that address again.
        async with run_apns_standin(test_pki, port=port) as back:
            request = await back.next_request(timeout=10)
            assert token_of(request) == TOKENS[0]
            await drained(stack)
        # Backed off, not hammering: a handful of attempts in all.
        assert len(accepted) <= 4


async def test_certificate_rejected_in_the_handshake(test_pki: Pki, tmp_path: Path) -> None:
    certificate = tmp_path / "push.pem"
    # Well-formed, right topic shape, but from an issuer the stand-in does not trust.
    shutil.copyfile(test_pki.client_stranger.combined_pem, certificate)
    (port,) = free_ports(1)
    settings = {"apns": apns_settings(test_pki, port, certificate=str(certificate))}
    async with run_stack(test_pki, settings, version=None, port=port) as stack:
        await register(stack, TOKENS[0])
        await new_mail(stack)
        await log_says(stack, "will be retried")
        assert stack.standin.requests == []
        # A fixed certificate file and a reload: the pending push goes out. (Topic
        # differs, so re-register first, as the iPhone would after a topic change.)
        shutil.copyfile(test_pki.client.combined_pem, certificate)
        stack.service.process.send_signal(signal.SIGHUP)
        await log_says(stack, "reloaded")
        await register(stack, TOKENS[0])
        await new_mail(stack)
        request = await stack.standin.next_request()
        await drained(stack)
    assert token_of(request) == TOKENS[0]
    assert request.headers["apns-topic"] == test_pki.client.topic


async def test_registration_for_a_topic_the_credentials_do_not_serve(
    test_pki: Pki, tmp_path: Path
) -> None:
    certificate = tmp_path / "push.pem"
    shutil.copyfile(test_pki.client.combined_pem, certificate)
    (port,) = free_ports(1)
    settings = {"apns": apns_settings(test_pki, port, certificate=str(certificate))}
    async with run_stack(test_pki, settings, version=None, port=port) as stack:
        await register(stack, TOKENS[0])
        # A new certificate with another topic: the registration cannot be pushed.
        shutil.copyfile(test_pki.client_with_topics.combined_pem, certificate)
        stack.service.process.send_signal(signal.SIGHUP)
        await log_says(stack, "reloaded")
        await new_mail(stack)
        await log_says(stack, "is registered for another topic")
        listed = (await devices(stack))[TOKENS[0]]
        await drained(stack)
    assert stack.standin.requests == []
    assert listed["last_push_result"].startswith(
        f"not pushed: topic {test_pki.client.topic} is not served by certificate"
    )


async def test_token_authentication(test_pki: Pki) -> None:
    (port,) = free_ports(1)
    topic = "com.apple.mobilemail.push.test.example"
    apns = {
        "token_key": str(test_pki.token_key),
        "key_id": "TESTKEY123",
        "team_id": "TEAM456789",
        "topic": topic,
        "endpoint": f"https://127.0.0.1:{port}",
        "ca_file": str(test_pki.ca_file),
    }
    async with run_stack(
        test_pki, {"apns": apns}, version=None, port=port, token_key=test_pki.token_public_key
    ) as stack:
        phone = await stack.iphone("alice")
        reply = await phone.xapplepushservice(ACCOUNT, TOKENS[0], ["INBOX"])
        assert f'aps-topic "{topic}"'.encode() in reply.untagged[-1]
        await phone.logout()
        before = time.time()
        await new_mail(stack)
        first = await stack.standin.next_request()
        await new_mail(stack)
        second = await stack.standin.next_request()
        await drained(stack)
    assert first.headers["apns-topic"] == topic
    # The stand-in checked the ES256 signature with the .p8 key's public half.
    (header, claims), _ = stack.standin.tokens
    assert header == {"alg": "ES256", "kid": "TESTKEY123"}
    assert claims["iss"] == "TEAM456789"
    assert before - 2 <= claims["iat"] <= time.time() + 2
    # One token for both: a new one only every 50 minutes.
    assert first.headers["authorization"] == second.headers["authorization"]
    assert stack.standin.peer_certificates == []


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _public_numbers(pem: Path) -> object:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem.read_bytes()).public_key().public_numbers()
