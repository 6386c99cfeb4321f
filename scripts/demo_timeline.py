"""The demo's timeline: register an iPhone, deliver a mail, watch the push arrive."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import trio

from tests.harness.certs import make_test_pki
from tests.harness.dovecot import deliver
from tests.harness.stack import run_stack

ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
# A made-up token: the stand-in accepts anything hex.
TOKEN = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def say(start: float, text: str) -> None:
    print(f"{(time.perf_counter() - start) * 1000:8.1f} ms  {text}", flush=True)


async def timeline() -> None:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dovenotify-demo-pki-") as pki_dir:
        pki = make_test_pki(Path(pki_dir))
        say(start, f"made a test CA and an Apple-shaped certificate (topic {pki.client.topic})")
        async with run_stack(pki, version=None) as stack:
            say(
                start,
                f"Dovecot {stack.dovecot.version} (pid {stack.dovecot.pid}), dovenotify serve"
                f" (pid {stack.service.process.pid}) and the APNs stand-in ({stack.standin.url})"
                " are running",
            )
            phone = await stack.iphone("alice")
            say(start, "iPhone logged in as alice over IMAP/TLS")
            reply = await phone.xapplepushservice(ACCOUNT, TOKEN, ["INBOX"])
            if not reply.ok:
                raise SystemExit(f"registration failed: {reply.tagged!r}")
            say(start, "registered: " + " | ".join(line.decode() for line in reply.untagged))
            delivered_at = time.perf_counter()
            await trio.to_thread.run_sync(
                deliver, stack.dovecot, "alice", b"Subject: Hello\r\n\r\nHello from the demo.\r\n"
            )
            say(start, "delivered a mail to alice over LMTP")
            request = await stack.standin.next_request()
            waited = (time.perf_counter() - delivered_at) * 1000
            say(
                start,
                f"push received by APNs stand-in after {waited:.1f} ms:"
                f" {request.method} {request.path} HTTP/{request.http_version}"
                f" apns-topic={request.headers['apns-topic']} body={request.body.decode()}",
            )
            await phone.logout()
    say(start, "stopped everything; done")


def main() -> int:
    try:
        trio.run(timeline)
    except Exception as e:  # the demo's one job is to say clearly what failed
        print(f"demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
