"""Benchmark 1: new mail → APNs latency through the real stack.

Real Dovecot (LMTP, Lua driver), `dovenotify serve` and the HTTP/2 mTLS APNs
stand-in, as in the end-to-end test. Two users each register an iPhone over
IMAP; then LMTP deliveries go in at a steady rate, alternating between them.
Latency is from the moment the LMTP client has Dovecot's reply to DATA to the
moment the stand-in receives the push (negative when the push arrived first:
the Lua driver hands the event over before Dovecot sends its reply). A push
counts for every delivery to its device whose DATA began before it arrived.

    python -m scripts.bench_latency [--rate 50] [--seconds 20]
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import trio

from scripts.bench_table import percentile, print_table
from tests.harness.apns_standin import Answer, RecordedRequest
from tests.harness.certs import make_test_pki
from tests.harness.dovecot import deliver
from tests.harness.postgres import running_postgres
from tests.harness.stack import run_stack

USERS = {"alice": "0a" * 32, "bob": "0b" * 32}
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"
TARGET_P99_MS = 25.0


async def measure(rate: float, seconds: float, database: str | None) -> None:
    arrivals: dict[str, list[float]] = defaultdict(list)

    def record(request: RecordedRequest) -> Answer:
        arrivals[request.path.rsplit("/", 1)[1]].append(time.monotonic())
        return Answer(200)

    replies: dict[str, list[tuple[float, float]]] = defaultdict(list)
    durations: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-pki-") as pki_dir:
        pki = make_test_pki(Path(pki_dir))
        settings = {"log_level": "info", **({"database": database} if database else {})}
        async with run_stack(pki, settings, version=None, responder=record) as stack:
            phones = []
            for user, token in USERS.items():
                phone = await stack.iphone(user)
                assert (await phone.xapplepushservice(ACCOUNT, token, ["INBOX"])).ok
                phones.append(phone)

            def one(user: str) -> None:
                took = deliver(stack.dovecot, user, b"Subject: bench\r\n\r\nhi\r\n")
                replied = time.monotonic()
                durations.append(took)
                replies[USERS[user]].append((replied - took, replied))

            count = int(rate * seconds)
            users = list(USERS)
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for i in range(count):
                    await trio.sleep_until(start + i / rate)
                    nursery.start_soon(trio.to_thread.run_sync, one, users[i % len(users)])
            # The last pushes: wait for them rather than for a fixed time.
            with trio.move_on_after(15):
                while any(
                    not arrivals[token] or arrivals[token][-1] < times[-1][0]
                    for token, times in replies.items()
                ):
                    await trio.sleep(0.01)
            sent_for = trio.current_time() - start
            # The driver's own account of events it could not hand over in time.
            not_sent = re.findall(
                r"dovenotify: \d+ event\(s\) not sent to .*", stack.dovecot.log_text()
            )
            problems = [
                line
                for line in stack.service.log_text().splitlines()
                if " WARNING " in line or " ERROR " in line
            ]
            for phone in phones:
                await phone.logout()

    # A push answers every delivery whose DATA began before it arrived: pushes to a
    # device coalesce when mail comes faster than APNs answers, by design.
    latencies = []
    unpushed = 0
    for token, times in replies.items():
        pushes = sorted(arrivals[token])
        for began, replied in times:
            index = bisect.bisect_left(pushes, began)
            if index == len(pushes):
                unpushed += 1
            else:
                latencies.append((pushes[index] - replied) * 1000)
    pushes_total = sum(map(len, arrivals.values()))
    latencies.sort()
    p99 = percentile(latencies, 99)
    for line in [*not_sent, *problems][:10]:
        print("  log:", line)
    print_table(
        f"New mail → APNs: {count} LMTP deliveries at {rate:g}/s over {sent_for:.1f} s"
        " (real Dovecot, dovenotify serve, HTTP/2 mTLS stand-in,"
        f" registrations in {'PostgreSQL' if database else 'SQLite'})",
        [
            ("latency p50", f"{percentile(latencies, 50):.1f} ms", ""),
            (
                "latency p99",
                f"{p99:.1f} ms",
                f"target ≤ {TARGET_P99_MS:g} ms: " + ("met" if p99 <= TARGET_P99_MS else "NOT met"),
            ),
            ("latency max", f"{latencies[-1]:.1f} ms", ""),
            ("LMTP DATA → reply, median", f"{statistics.median(durations) * 1000:.1f} ms", ""),
            ("deliveries never followed by a push", str(unpushed), "(0 expected)"),
            ("pushes / deliveries", f"{pushes_total / count:.2f}", "below 1: coalesced"),
            ("events the Lua driver could not send (spooled)", str(len(not_sent)), ""),
            ("service warnings and errors", str(len(problems)), ""),
        ],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to deliver")
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="keep registrations in a PostgreSQL server started for the run (default SQLite)",
    )
    args = parser.parse_args(argv)
    if not args.postgresql:
        trio.run(measure, args.rate, args.seconds, None)
        return
    with running_postgres() as server:
        trio.run(measure, args.rate, args.seconds, server.create_database("bench"))


if __name__ == "__main__":
    main()
