"""Benchmark 1: new mail → APNs latency through the real stack.

Real Dovecot (LMTP, Lua driver), `dovenotify serve` and the HTTP/2 mTLS APNs
stand-in, as in the end-to-end test. Two users each register an iPhone over
IMAP; then LMTP deliveries go in at a steady rate, alternating between them.
Latency is from the moment the LMTP client has Dovecot's reply to DATA to the
moment the stand-in receives the push (negative when the push arrived first:
the Lua driver hands the event over before Dovecot sends its reply). A push
counts for every delivery to its device whose DATA began before it arrived.

Then the two ways an event reaches the service, side by side in one run: a line
on the event socket (connect, send, close: the driver's fallback) and a line
appended to the writer's spool file (open, one write, close: the driver's normal
path), each from a process running as the mail uid, at a steady rate: the
service's CPU per line (/proc/PID/task/*/schedstat, every thread) and the time
from the write to the stand-in's push request.

    python -m scripts.bench_latency [--rate 50] [--seconds 20] [--lines 2000]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import os
import re
import statistics
import subprocess
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import trio

from scripts.bench_table import percentile, print_table
from tests.harness.apns_standin import Answer, RecordedRequest
from tests.harness.certs import make_test_pki
from tests.harness.dovecot import MAIL_USER, deliver, installation
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
            # The driver's own account of events it could neither append nor send.
            not_sent = re.findall(
                r"dovenotify: \d+ event\(s\) (?:not sent|lost): .*", stack.dovecot.log_text()
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
            ("events the Lua driver could not hand over", str(len(not_sent)), ""),
            ("service warnings and errors", str(len(problems)), ""),
        ],
    )


# Sends `count` copies of a line at `rate` per second, each as the driver would, and
# answers `ok` when done: commands `socket|spool COUNT RATE HEXLINE` on stdin.
WRITER = textwrap.dedent(
    """
    import socket, sys, time
    spool_file, socket_path = sys.argv[1:]
    def spool(line):
        with open(spool_file, "ab", buffering=0) as f:
            f.write(line)
    def connect(line):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(socket_path)
            s.sendall(line)
    for command in sys.stdin:
        how, count, rate, line = command.split()
        send, line = spool if how == "spool" else connect, bytes.fromhex(line)
        start = time.monotonic()
        for i in range(int(count)):
            time.sleep(max(0.0, start + i / float(rate) - time.monotonic()))
            send(line)
        print("ok", flush=True)
    """
)
# Lines for a user with no device: the service reads, checks and looks them up,
# and pushes nobody, so the CPU measured is the intake's.
NOBODYS = b"MessageNew\tcarol\tINBOX\tlmtp\n"
ALICES = b"MessageNew\talice\tINBOX\tlmtp\n"
LATENCY_SAMPLES = 60


def service_cpu_ns(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        # A thread may end between listing and reading.
        with contextlib.suppress(OSError, ValueError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


async def measure_intake(lines: int, rate: float) -> None:
    arrivals: list[float] = []

    def record(request: RecordedRequest) -> Answer:
        arrivals.append(time.monotonic())
        return Answer(200)

    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-pki-") as pki_dir:
        pki = make_test_pki(Path(pki_dir))
        async with run_stack(pki, {"log_level": "info"}, version=None, responder=record) as stack:
            phone = await stack.iphone("alice")
            assert (await phone.xapplepushservice(ACCOUNT, USERS["alice"], ["INBOX"])).ok
            await phone.logout()
            uid = installation(None).uid(MAIL_USER)
            spool_file = Path(stack.settings["event_spool"]) / str(uid)
            argv = ["/usr/bin/python3", "-I", "-c", WRITER, str(spool_file)]
            argv.append(stack.settings["event_socket"])
            pid = stack.service.process.pid
            with subprocess.Popen(
                argv, user=uid, group=uid, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            ) as writer:
                assert writer.stdin is not None and writer.stdout is not None

                def send(how: str, count: int, line: bytes) -> None:
                    writer.stdin.write(f"{how} {count} {rate:g} {line.hex()}\n")
                    writer.stdin.flush()
                    assert writer.stdout.readline() == "ok\n"

                async def pushed_after(how: str, line: bytes) -> float:
                    before = len(arrivals)
                    sent = time.monotonic()
                    await trio.to_thread.run_sync(send, how, 1, line)
                    with trio.fail_after(10):
                        while len(arrivals) == before:
                            await trio.sleep(0.001)
                    return (arrivals[-1] - sent) * 1000

                cpu: dict[str, list[float]] = defaultdict(list)
                latency: dict[str, list[float]] = defaultdict(list)
                for how in ("socket", "spool") * 2:
                    await pushed_after(how, ALICES)  # settled: all before it is handled
                    used = service_cpu_ns(pid)
                    await trio.to_thread.run_sync(send, how, lines, NOBODYS)
                    await pushed_after(how, ALICES)
                    cpu[how].append((service_cpu_ns(pid) - used) / lines / 1000)
                for _ in range(LATENCY_SAMPLES // 2):
                    for how in ("socket", "spool"):
                        latency[how].append(await pushed_after(how, ALICES))
                        await trio.sleep(0.02)
                writer.stdin.close()
            problems = [
                line
                for line in stack.service.log_text().splitlines()
                if " WARNING " in line or " ERROR " in line
            ]

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} ms"

    rows = [
        (
            f"service CPU per line, {how}",
            f"{statistics.median(cpu[how]):.0f} µs",
            "runs: " + ", ".join(f"{v:.0f}" for v in cpu[how]),
        )
        for how in ("socket", "spool")
    ]
    ratio = statistics.median(cpu["spool"]) / statistics.median(cpu["socket"])
    rows.append(("spool ÷ socket, CPU per line", f"{ratio:.2f}", ""))
    rows += [
        (f"write → push request, {how}, median", ms(latency[how]), f"p90 {p90(latency[how])}")
        for how in ("socket", "spool")
    ]
    rows.append(("service warnings and errors", str(len(problems)), ""))
    print_table(
        f"Socket vs spool: {lines} lines each way at {rate:g}/s, twice, from a process"
        f" running as the mail uid; {LATENCY_SAMPLES // 2} pushes each way"
        f" (load {os.getloadavg()[0]:.1f})",
        rows,
    )


def p90(values: list[float]) -> str:
    return f"{percentile(sorted(values), 90):.2f} ms"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=50.0, help="deliveries per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to deliver")
    parser.add_argument(
        "--postgresql",
        action="store_true",
        help="keep registrations in a PostgreSQL server started for the run (default SQLite)",
    )
    parser.add_argument(
        "--lines",
        type=int,
        default=2000,
        help="lines sent each way to compare the event socket with the spool (0: skip)",
    )
    args = parser.parse_args(argv)
    if args.lines:
        trio.run(measure_intake, args.lines, 400.0)
    if not args.postgresql:
        trio.run(measure, args.rate, args.seconds, None)
        return
    with running_postgres() as server:
        trio.run(measure, args.rate, args.seconds, server.create_database("bench"))


if __name__ == "__main__":
    main()
