"""Benchmark 6: what a restart costs relayed IMAP sessions and logins, per relay_process.

Each process is restarted as supervisord or systemd does it (SIGTERM, wait for
the exit, start, wait for READY=1) while
- `--sessions` connections handed to the relay (as the post-login helper hands
  them) are open: afterwards, how many still relay;
- a prober hands the relay a connection every 2 ms exactly as the helper does,
  minus the final GO (the relay then lets go of it), and waits up to
  relay_timeout (0.5 s) for the answer, as the helper does. The window is from
  the first probe left unanswered to the next one answered: the time during
  which a login goes straight to Dovecot, without push registration.

    python -m scripts.bench_restart [--rounds 5] [--sessions 20]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import trio

from dovenotify.admin.doctor import probe_relay
from scripts.bench_table import print_table
from tests.harness.apns_standin import run_apns_standin
from tests.harness.certs import make_test_pki
from tests.harness.handoff import hand_over, relays
from tests.harness.service import RunningService, run_service
from tests.harness.stack import service_settings

PROBE_INTERVAL = 0.002
RELAY_TIMEOUT = 0.5
# (relay_process, the process restarted)
CASES = (("inline", "serve"), ("separate", "serve"), ("separate", "relay"))


@attrs.define
class Prober:
    """Probes the relay socket in a thread; remembers when each probe started and
    whether the relay answered it."""

    path: str
    probes: list[tuple[float, bool]] = attrs.field(factory=list)
    _stop: threading.Event = attrs.field(factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            self.probes.append((started, probe_relay(Path(self.path), RELAY_TIMEOUT) is None))
            time.sleep(PROBE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()

    def longest_window(self) -> float:
        """The longest time from a probe left unanswered to the next one answered."""
        longest, first_failed = 0.0, None
        for started, answered in self.probes:
            if not answered and first_failed is None:
                first_failed = started
            elif answered and first_failed is not None:
                longest = max(longest, started - first_failed)
                first_failed = None
        if first_failed is not None:
            raise AssertionError("the relay did not come back")
        return longest


def still_relays(pair: tuple[socket.socket, socket.socket]) -> bool:
    try:
        return relays(pair)
    except OSError:
        return False


@attrs.frozen
class Round:
    window: float
    kept: int
    stop: float
    start: float


async def restart_round(
    processes: AsyncExitStack,
    running: dict[str, RunningService],
    which: str,
    start: Callable[[str], Any],
    relay_socket: str,
    sessions: int,
) -> Round:
    held = [hand_over(relay_socket) for _ in range(sessions)]
    prober = Prober(relay_socket)
    thread = threading.Thread(target=prober.run)
    thread.start()
    try:
        await trio.sleep(0.05)  # some answered probes before the restart
        began = time.perf_counter()
        await running[which].stop()
        stopped = time.perf_counter()
        running[which] = await processes.enter_async_context(start(which))
        ready = time.perf_counter()
        await trio.sleep(0.05)
    finally:
        prober.stop()
        await trio.to_thread.run_sync(thread.join)
    kept = sum(still_relays(pair) for pair in held)
    for client, server in held:
        client.close()
        server.close()
    return Round(prober.longest_window(), kept, stopped - began, ready - stopped)


async def measure(mode: str, which: str, rounds: int, sessions: int) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-restart-") as tmp:
        root = Path(tmp)
        pki = make_test_pki(root / "pki")
        async with run_apns_standin(pki) as standin, AsyncExitStack() as processes:
            settings = {
                **service_settings(root, pki, standin.url),
                "relay_process": mode,
                "log_level": "warning",
            }

            def start(command: str) -> Any:
                return run_service(root / "service", settings, command=command)

            running = {"serve": await processes.enter_async_context(start("serve"))}
            if mode == "separate":
                running["relay"] = await processes.enter_async_context(start("relay"))
            results = [
                await restart_round(
                    processes, running, which, start, settings["relay_socket"], sessions
                )
                for _ in range(rounds)
            ]
    windows = sorted(r.window * 1000 for r in results)
    label = f"{mode}: restart `dovenotify {which}`"
    return [
        (
            f"{label}: logins without relay",
            f"{statistics.median(windows):.0f} ms",
            f"median of {rounds}; max {windows[-1]:.0f} ms",
        ),
        (
            f"{label}: relayed sessions kept",
            f"{min(r.kept for r in results)}/{sessions}",
            "fewest kept in any round",
        ),
        (
            f"{label}: stop, start to READY",
            f"{statistics.median(r.stop for r in results) * 1000:.0f} ms, "
            f"{statistics.median(r.start for r in results) * 1000:.0f} ms",
            "medians",
        ),
    ]


async def main(rounds: int, sessions: int) -> None:
    rows = [("what", "figure", "note")]
    for mode, which in CASES:
        rows += await measure(mode, which, rounds, sessions)
    print_table("Restarts: relayed sessions and the logins in the gap", rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sessions", type=int, default=20)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.sessions)
