"""dovenotify is never in Dovecot's way, and nothing is lost while it is away.

With the service hung (SIGSTOP) or stopped (its socket gone), an LMTP delivery
takes at most twice event_timeout longer and succeeds (the Lua driver appends to
its spool file whatever the service does); when the service is back, every
device that missed a push is pushed within 10 s.
"""

from __future__ import annotations

import signal
import statistics
import time

import trio

from tests.harness.dovecot import deliver
from tests.harness.service import run_service
from tests.harness.stack import Stack, run_stack

EVENT_TIMEOUT = 0.2  # what the stack renders into Dovecot's configuration
ROUNDS = 3
MESSAGE = b"From: a@example.org\r\nSubject: hello\r\n\r\nhi\r\n"
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"


def token(n: int) -> str:
    return f"{n:02x}" * 32


async def median_delivery(stack: Stack, rcpt: str = "alice") -> float:
    times = []
    for _ in range(ROUNDS):
        times.append(await trio.to_thread.run_sync(deliver, stack.dovecot, rcpt, MESSAGE))
    return statistics.median(times)


async def pushed_tokens(stack: Stack, count: int) -> list[str]:
    return sorted(
        [(await stack.standin.next_request()).path.rsplit("/", 1)[1] for _ in range(count)]
    )


async def test_deliveries_go_on_and_pushes_follow_when_service_is_back(test_pki, dovecot_version):
    async with run_stack(test_pki, version=dovecot_version) as stack:
        for n, user in ((1, "alice"), (2, "bob")):
            phone = await stack.iphone(user)
            assert (await phone.xapplepushservice(ACCOUNT, token(n), ["INBOX"])).ok
            await phone.logout()
        await trio.to_thread.run_sync(deliver, stack.dovecot, "alice", MESSAGE)  # creates INBOX
        await stack.standin.next_request()
        healthy = await median_delivery(stack)
        for _ in range(ROUNDS):
            await stack.standin.next_request()

        # Hung: the lines wait in the spool file until it runs again.
        stack.service.process.send_signal(signal.SIGSTOP)
        try:
            hung = await median_delivery(stack)
        finally:
            stack.service.process.send_signal(signal.SIGCONT)
        assert await pushed_tokens(stack, 1) == [token(1)]

        # Stopped: the driver appends to its spool file all the same.
        assert await stack.service.stop() == 0
        stopped = await median_delivery(stack)
        await trio.to_thread.run_sync(deliver, stack.dovecot, "bob", MESSAGE)
        print(
            f"\nLMTP delivery medians: healthy {healthy * 1000:.1f} ms,"
            f" service hung {hung * 1000:.1f} ms, stopped {stopped * 1000:.1f} ms"
        )
        assert hung < healthy + 2 * EVENT_TIMEOUT
        assert stopped < healthy + 2 * EVENT_TIMEOUT
        # Nothing for the driver to warn about: it never waited on the service.
        assert "dovenotify:" not in stack.dovecot.log_text()

        before = len(stack.standin.requests)  # SIGTERM sent whatever was pending
        async with run_service(stack.root / "service", stack.settings) as service:
            back = time.monotonic()
            with trio.fail_after(10):
                while len(stack.standin.requests) < before + 2:
                    await stack.standin.next_request()
            await service.wait_for_log("from the spool of uid")
        # One push per device that missed one, however many events it missed.
        assert _tokens(stack.standin.requests[before:]) == [token(1), token(2)]
        print(f"pushed {time.monotonic() - back:.1f} s after the service was back")


def _tokens(requests) -> list[str]:
    return sorted(r.path.rsplit("/", 1)[1] for r in requests)
