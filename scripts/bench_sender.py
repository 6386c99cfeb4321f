"""Benchmark 3: pushes/s from dovenotify's APNs sender to a fast HTTP/2 sink.

The sink is Debian's `nghttpd`, twice on the same files: one instance requires a
client certificate (mutual TLS, as APNs does), the other does not, because the
reference load generator `h2load` cannot present one. dovenotify's sender runs
against both; h2load (one connection, as many concurrent streams as dovenotify
allows) gives the ceiling of this machine. A bare h2 client on trio, doing
nothing but the HTTP/2 frames, shows what the same Python stack can do at best.
Each figure is the median of `--runs` rounds; a ratio is the median of each
round's ratio, both sides measured in that round.

    python -m scripts.bench_sender [--seconds 5] [--runs 3]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import trio

from dovenotify.apns.certificates import client_ssl_context, load_credentials
from dovenotify.apns.protocol import Push
from dovenotify.apns.sender import DEFAULT_MAX_IN_FLIGHT, ApnsSender
from scripts.bench_table import print_table
from tests.harness.certs import Pki, make_test_pki
from tests.harness.dovecot import free_ports

TOKEN = "ab" * 32
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"


@contextlib.contextmanager
def nghttpd(pki: Pki, htdocs: Path, *, verify_client: bool) -> Iterator[str]:
    """An nghttpd serving `htdocs` over TLS on a free port; stopped by its PID."""
    (port,) = free_ports(1)
    args = ["nghttpd", "-d", str(htdocs), str(port), str(pki.server_key), str(pki.server_cert)]
    if verify_client:
        args.insert(1, "--verify-client")
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _await_port(port, process)
        yield f"https://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _await_port(port: int, process: subprocess.Popen[bytes]) -> None:
    # nghttpd has no readiness signal: wait until it accepts connections.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nghttpd exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise RuntimeError("nghttpd did not start")


async def run_sender(pki: Pki, url: str, seconds: float) -> tuple[float, int, int]:
    """(pushes/s, delivered, failed) from one ApnsSender kept busy for `seconds`."""
    credentials = load_credentials(pki.client.combined_pem, None, None)
    push = Push(device_token=TOKEN, topic=pki.client.topic, account_id=ACCOUNT)
    counts = {"delivered": 0, "failed": 0}
    async with ApnsSender(credentials, endpoint=url, ca_file=pki.ca_file) as sender:
        # Warm up: the TLS handshake and HTTP/2 settings are not what is measured.
        await sender.send(push)
        start = trio.current_time()
        deadline = start + seconds

        async def worker() -> None:
            while trio.current_time() < deadline:
                outcome = await sender.send(push)
                counts["delivered" if outcome.status == 200 else "failed"] += 1

        async with trio.open_nursery() as nursery:
            for _ in range(DEFAULT_MAX_IN_FLIGHT):
                nursery.start_soon(worker)
        elapsed = trio.current_time() - start
    return counts["delivered"] / elapsed, counts["delivered"], counts["failed"]


async def run_bare_h2(pki: Pki, url: str, seconds: float) -> float:
    """Pushes/s from plain h2 on one trio TLS stream.

    Not dovenotify's sender: a measurement of what the same Python stack (trio,
    ssl, h2) can do when each request costs only its HTTP/2 frames (no timeouts,
    retries, stream limit or PING), to tell how much the sender's own work costs.
    One reader task hands answers to the waiting requests; one writer task
    flushes whatever frames have piled up in one TLS write.
    """
    credentials = load_credentials(pki.client.combined_pem, None, None)
    context = client_ssl_context(credentials, pki.ca_file)
    port = int(url.rsplit(":", 1)[1])
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", port, ssl_context=context, https_compatible=True
    )
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    answers: dict[int, trio.Event] = {}
    statuses: dict[int, bytes] = {}
    pending = trio.Event()
    body = f'{{"aps":{{"account-id":"{ACCOUNT}"}}}}'.encode()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"https"),
        (b":authority", b"127.0.0.1"),
        (b":path", f"/3/device/{TOKEN}".encode()),
        (b"apns-topic", pki.client.topic.encode()),
        (b"apns-push-type", b"background"),
    ]
    delivered = 0

    async def writer() -> None:
        nonlocal pending
        while True:
            await pending.wait()
            pending = trio.Event()
            if data := connection.data_to_send():
                await stream.send_all(data)

    async def reader() -> None:
        while data := await stream.receive_some(65536):
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    answers.pop(event.stream_id).set()
            pending.set()

    async def worker(deadline: float) -> None:
        nonlocal delivered
        while trio.current_time() < deadline:
            stream_id = connection.get_next_available_stream_id()
            answers[stream_id] = done = trio.Event()
            connection.send_headers(stream_id, headers)
            connection.send_data(stream_id, body, end_stream=True)
            pending.set()
            await done.wait()
            delivered += statuses.pop(stream_id, b"") == b"200"

    async with trio.open_nursery() as background:
        background.start_soon(writer)
        background.start_soon(reader)
        pending.set()
        start = trio.current_time()
        async with trio.open_nursery() as workers:
            for _ in range(DEFAULT_MAX_IN_FLIGHT):
                workers.start_soon(worker, start + seconds)
        elapsed = trio.current_time() - start
        background.cancel_scope.cancel()
    await stream.aclose()
    return delivered / elapsed


def run_h2load(url: str, body: Path, requests: int) -> float:
    result = subprocess.run(
        [
            "h2load",
            "-n",
            str(requests),
            "-c",
            "1",
            "-m",
            str(DEFAULT_MAX_IN_FLIGHT),
            "-d",
            str(body),
            "-H",
            "apns-topic: bench",
            "-H",
            "apns-push-type: background",
            f"{url}/3/device/{TOKEN}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    match = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", result.stdout)
    succeeded = re.search(r"(\d+) succeeded", result.stdout)
    if not match or not succeeded or int(succeeded.group(1)) != requests:
        raise RuntimeError(f"h2load did not finish cleanly:\n{result.stdout}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per sender run")
    parser.add_argument("--runs", type=int, default=3, help="rounds; medians are reported")
    args = parser.parse_args(argv)
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-sender-") as tmp:
        root = Path(tmp)
        pki = make_test_pki(root / "pki")
        htdocs = root / "htdocs"
        (htdocs / "3" / "device").mkdir(parents=True)
        (htdocs / "3" / "device" / TOKEN).write_bytes(b"")
        body = root / "body.json"
        body.write_text(f'{{"aps":{{"account-id":"{ACCOUNT}"}}}}')
        with (
            nghttpd(pki, htdocs, verify_client=True) as mtls_url,
            nghttpd(pki, htdocs, verify_client=False) as tls_url,
        ):
            for _ in range(args.runs):
                mtls, mtls_ok, mtls_failed = trio.run(run_sender, pki, mtls_url, args.seconds)
                tls, tls_ok, tls_failed = trio.run(run_sender, pki, tls_url, args.seconds)
                bare = trio.run(run_bare_h2, pki, mtls_url, args.seconds)
                ceiling = run_h2load(tls_url, body, max(20000, int(tls * args.seconds * 4)))
                rounds.append(
                    {
                        "mtls": mtls,
                        "tls": tls,
                        "bare": bare,
                        "ceiling": ceiling,
                        "failed": mtls_failed + tls_failed,
                        "ok": mtls_ok + tls_ok,
                        "of_ceiling": tls / ceiling,
                        "of_bare": mtls / bare,
                    }
                )

    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    def each(key: str, form: str = ",.0f") -> str:
        return "runs: " + " / ".join(f"{r[key]:{form}}" for r in rounds)

    mtls = median("mtls")
    failed = sum(r["failed"] for r in rounds)
    print_table(
        "Sender throughput (one process, one HTTP/2 connection,"
        f" {DEFAULT_MAX_IN_FLIGHT} streams in flight; medians of {args.runs} runs)",
        [
            ("dovenotify → nghttpd, mutual TLS", f"{mtls:,.0f} pushes/s", each("mtls")),
            (
                "dovenotify → nghttpd, server TLS only",
                f"{median('tls'):,.0f} pushes/s",
                each("tls"),
            ),
            (
                "bare h2 on trio → nghttpd, mutual TLS",
                f"{median('bare'):,.0f} pushes/s",
                each("bare") + " (measurement only)",
            ),
            (
                "h2load → nghttpd, server TLS only (ceiling)",
                f"{median('ceiling'):,.0f} req/s",
                each("ceiling"),
            ),
            ("ratio dovenotify / h2load", f"{median('of_ceiling'):.3f}", each("of_ceiling", ".3f")),
            (
                "ratio dovenotify / bare h2 (both mutual TLS)",
                f"{median('of_bare'):.2f}",
                each("of_bare", ".2f"),
            ),
            (
                "pushes not delivered",
                f"{failed:,.0f}",
                f"of {sum(r['ok'] for r in rounds) + failed:,.0f}",
            ),
            ("target", "≥ 5,000 pushes/s", "met" if mtls >= 5000 else "NOT met"),
        ],
    )


if __name__ == "__main__":
    main()
