"""Benchmark: what the post-login relay costs, against Dovecot direct, in one run.

Two Dovecots of the host's version side by side: one with dovenotify's snippet
and `dovenotify serve` (every session goes through the helper and the relay),
one plain. The same figures are taken from both with the same blocking client:

- FETCH of a 50 MB message, over plain IMAP and over TLS (MB/s, median of runs
  after one unmeasured warm-up FETCH per session), and the CPU time each FETCH
  costs Dovecot (imap, imap-login), the relay and this client: with two cores shared
  by all three, the throughput ratio follows the CPU ratio as soon as anything
  else runs, so the CPU figures say what the ratio alone cannot;
- NOOP round trips on an open session (median; the relay's added latency);
- LOGIN → tagged OK (median; what the post-login helper adds to a login);
- the relay's memory per idle connection, with thousands handed to it at once
  the way the helper does (a Dovecot per connection would measure Dovecot).

    python -m scripts.bench_relay [--fetch-mb 50] [--fetch-runs 15] [--noops 2000]
                                  [--logins 30] [--connections 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import multiprocessing
import os
import random
import re
import resource
import socket
import ssl
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import attrs
import trio

from scripts.bench_table import percentile, print_table
from tests.harness.certs import make_test_pki
from tests.harness.dovecot import Dovecot, put_message, running_dovecot
from tests.harness.handoff import hand_over, relays
from tests.harness.imap_client import ImapClient
from tests.harness.stack import SYSTEM_PYTHON, Stack, run_stack

TARGET_THROUGHPUT_RATIO = 0.9
TARGET_ADDED_COMMAND_MS = 0.1
# Added login time: median at most this above the bare Python start; p99 at most.
TARGET_LOGIN_ABOVE_FLOOR_MS = 2.0
TARGET_LOGIN_P99_MS = 20.0
TARGET_LOAD_RATIO = 0.9
LOAD_CLIENTS = 20
LOAD_PROCESSES = 2
LOAD_MESSAGES = 200
# Dovecot allows 10 sessions per user and address by default; the load has more.
LOAD_CONF = "protocol imap {\n  mail_max_userip_connections = 100\n}\n"
# With logins: each client logs out and in again after this many commands.
COMMANDS_PER_LOGIN = 10
TARGET_BYTES_PER_CONNECTION = 32 * 1024
TIME_LIMIT = 600.0  # the whole run, so that a hang cannot keep a machine busy
_LITERAL = re.compile(rb"\{(\d+)\}\r\n$")
Row = tuple[str, str, str]


class Session:
    """A blocking IMAP client that reads as fast as the socket allows."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        self.buffer = bytearray()
        self.scratch = memoryview(bytearray(4 * 1024 * 1024))
        self.tags = 0
        self.read_line()  # greeting

    def read_line(self) -> bytes:
        while (end := self.buffer.find(b"\r\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buffer += chunk
        line = bytes(self.buffer[: end + 2])
        del self.buffer[: end + 2]
        return line

    def command(self, text: str) -> bytes:
        """Send a command; return its tagged reply, skipping literals unread."""
        self.tags += 1
        tag = b"b%d " % self.tags
        self.sock.sendall(tag + text.encode() + b"\r\n")
        while True:
            line = self.read_line()
            if line.startswith(tag):
                return line
            if (literal := _LITERAL.search(line)) is not None:
                self.skip(int(literal[1]))

    def skip(self, size: int) -> None:
        taken = min(size, len(self.buffer))
        del self.buffer[:taken]
        size -= taken
        while size > 0:
            got = self.sock.recv_into(self.scratch, min(size, len(self.scratch)))
            if not got:
                raise EOFError("connection closed inside a literal")
            size -= got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.command("LOGOUT")
        self.sock.close()


def login(host: str, port: int, tls: ssl.SSLContext | None = None) -> tuple[Session, float]:
    """A logged-in session, and the seconds from LOGIN to its tagged OK."""
    session = Session(host, port, tls)
    started = time.perf_counter()
    reply = session.command('LOGIN "alice" "secret"')
    elapsed = time.perf_counter() - started
    if b" OK " not in reply:
        raise RuntimeError(f"LOGIN failed: {reply!r}")
    return session, elapsed


def message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nSubject: big\r\n\r\n"
    line = os.urandom(38).hex().encode() + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[: size - len(head) - 2] + b"\r\n"


async def append(dovecot: Dovecot, data: bytes) -> None:
    client = await ImapClient.connect(dovecot.host, dovecot.imap_port)
    await client.login("alice", "secret")
    reply = await client.append("INBOX", data)
    if not reply.ok:
        raise RuntimeError(f"APPEND failed: {reply}")
    await client.logout()


def fetch_seconds(session: Session) -> float:
    started = time.perf_counter()
    reply = session.command("FETCH 1 BODY.PEEK[]")
    elapsed = time.perf_counter() - started
    if b" OK " not in reply:
        raise RuntimeError(f"FETCH failed: {reply!r}")
    return elapsed


def cpu_seconds(pids: list[int]) -> float:
    """CPU time used so far by all threads of these processes (ns-exact, unlike /proc/PID/stat)."""
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def dovecot_pids(dovecot: Dovecot) -> list[int]:
    """Dovecot's processes: imap, and imap-login, which does the TLS."""
    pids = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == dovecot.pid:
                pids.append(int(entry.name))
    return pids


@attrs.define
class CpuMeter:
    """Times a FETCH and keeps what it cost each side: Dovecot, relay (if any), client."""

    session: Session
    dovecot: list[int]
    relay: list[int]
    costs: list[tuple[float, float, float]] = attrs.Factory(list)

    def fetch(self) -> float:
        dovecot, relay = cpu_seconds(self.dovecot), cpu_seconds(self.relay)
        client = time.thread_time()
        elapsed = fetch_seconds(self.session)
        self.costs.append(
            (
                cpu_seconds(self.dovecot) - dovecot,
                cpu_seconds(self.relay) - relay,
                time.thread_time() - client,
            )
        )
        return elapsed

    def median_ms(self, which: int) -> float:
        return statistics.median(cost[which] for cost in self.costs) * 1000

    def summary(self) -> str:
        relay = f" + relay {self.median_ms(1):.1f}" if self.relay else ""
        return f"Dovecot {self.median_ms(0):.1f}{relay} + client {self.median_ms(2):.1f} ms"

    def server_ms(self) -> float:
        return statistics.median(cost[0] + cost[1] for cost in self.costs) * 1000


def noop_seconds(session: Session) -> float:
    started = time.perf_counter()
    session.command("NOOP")
    return time.perf_counter() - started


def login_seconds(dovecot: Dovecot) -> float:
    session, elapsed = login(dovecot.host, dovecot.imap_port)
    session.close()
    return elapsed


def python_start_seconds() -> float:
    """One start of the bare system Python, as the helper's own start costs at least."""
    started = time.perf_counter()
    subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", "pass"], check=True)
    return time.perf_counter() - started


def hook_conf(version: str, helper: str) -> str:
    """Dovecot's post-login hook running `helper` (then the chain), without dovenotify."""
    internal = "$default_internal_user" if version == "2.3" else "$SET:default_internal_user"
    return (
        "service imap {\n  executable = imap imap-postlogin\n}\n"
        f"service imap-postlogin {{\n  executable = script-login {helper}\n"
        f"  user = {internal}\n  unix_listener imap-postlogin {{\n  }}\n}}\n"
    )


# A Python helper that does nothing but go on with the chain: the least any helper
# in Python can cost.
EXEC_ONLY = "import posix, sys\nposix.execv(sys.argv[1], sys.argv[1:])\n"


def login_rows(version: str, sides: dict[str, Dovecot], count: int) -> list[Row]:
    """LOGIN → OK on each side, beside the bare Python start, taken turn about.

    `sides` maps a name to a Dovecot: "direct" (no hook), "relayed" (dovenotify),
    and others with a post-login hook that only goes on with the chain."""
    floor: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(count):
        floor.append(python_start_seconds())
        for name, d in sides.items():
            times[name].append(login_seconds(d))
    # Each login against the direct one of the same turn: load from elsewhere that
    # hits both alike cancels out.
    added = {
        name: sorted((t - d) * 1000 for t, d in zip(values, times["direct"], strict=True))
        for name, values in times.items()
        if name != "direct"
    }
    floor_ms = statistics.median(floor) * 1000
    rows: list[Row] = [
        (f"Dovecot {version}: python3 -I -S -c pass (median)", f"{floor_ms:.1f} ms", "the floor"),
        (
            f"Dovecot {version}: LOGIN → OK, direct (median)",
            f"{statistics.median(times['direct']) * 1000:.1f} ms",
            "",
        ),
    ]
    for name, values in added.items():
        if name != "relayed":
            rows.append(
                (
                    f"Dovecot {version}: added by the hook with {name} (median)",
                    f"{statistics.median(values):.1f} ms",
                    "no dovenotify: what Dovecot's post-login hook costs by itself",
                )
            )
    relayed = added["relayed"]
    above = statistics.median(relayed) - floor_ms
    p99 = percentile(relayed, 99)
    return [
        *rows,
        (
            f"Dovecot {version}: added by helper + relay (median)",
            f"{statistics.median(relayed):.1f} ms",
            f"{above:+.1f} ms against the floor; "
            + ratio_note(above, TARGET_LOGIN_ABOVE_FLOOR_MS, False),
        ),
        (
            f"Dovecot {version}: added by helper + relay (p99 of {count})",
            f"{p99:.1f} ms",
            ratio_note(p99, TARGET_LOGIN_P99_MS, False),
        ),
    ]


# --- concurrent-client load -------------------------------------------------------


def load_message(n: int) -> bytes:
    words = " ".join(("push", "mail", "relay", "imap")[(n * 7 + i) % 4] for i in range(60))
    return (
        f"From: load{n}@example.org\r\nTo: alice@example.org\r\nSubject: load {n}\r\n"
        f"Message-ID: <{n}@load.example.org>\r\n\r\n{words}\r\n"
    ).encode()


def seed_load_mailbox(dovecot: Dovecot) -> None:
    for n in range(LOAD_MESSAGES):
        put_message(dovecot, "alice", load_message(n), f"1700000000.load{n}.bench", "S")


def load_commands(rng: random.Random) -> list[str]:
    """A random mix of what mail clients send on an open session."""
    n = rng.randrange(1, LOAD_MESSAGES + 1)
    return [
        f"FETCH {n}:{min(n + 9, LOAD_MESSAGES)} (FLAGS INTERNALDATE RFC822.SIZE ENVELOPE)",
        f"FETCH {n} BODY.PEEK[]",
        f'SEARCH SUBJECT "load {n}"',
        "UID SEARCH UNFLAGGED SINCE 1-Jan-2020",
        f"STORE {n} +FLAGS.SILENT (\\Flagged)",
        f"STORE {n} -FLAGS.SILENT (\\Flagged)",
        "NOOP",
        "SELECT INBOX",
    ]


async def load_session(host: str, port: int, deadline: float, relogin: bool, seed: int) -> int:
    """Commands completed by one client until `deadline` (LOGIN and LOGOUT count too)."""
    rng = random.Random(seed)
    done = 0
    while trio.current_time() < deadline:
        async with await ImapClient.connect(host, port) as client:
            await client.login("alice", "secret")
            await ok(client, "SELECT INBOX")
            done += 2
            for _ in itertools.count() if not relogin else range(COMMANDS_PER_LOGIN):
                if trio.current_time() >= deadline:
                    break
                await ok(client, rng.choice(load_commands(rng)))
                done += 1
            await ok(client, "LOGOUT")
            done += 1
    return done


async def ok(client: ImapClient, command: str) -> None:
    reply = await client.command(command)
    if not reply.ok:
        raise RuntimeError(f"{command} failed: {reply.tagged!r}")


async def _load_worker(host: str, port: int, clients: int, seconds: float, relogin: bool) -> int:
    counts: list[int] = []
    deadline = trio.current_time() + seconds

    async def one(seed: int) -> None:
        counts.append(await load_session(host, port, deadline, relogin, seed))

    async with trio.open_nursery() as nursery:
        for seed in range(clients):
            nursery.start_soon(one, seed)
    return sum(counts)


def load_worker(host: str, port: int, clients: int, seconds: float, relogin: bool) -> int:
    """In a worker process: `clients` sessions for `seconds`; commands completed."""
    return trio.run(_load_worker, host, port, clients, seconds, relogin)


def load_rows(
    version: str, direct: Dovecot, relayed: Dovecot, args: argparse.Namespace
) -> list[Row]:
    rows: list[Row] = []
    per_process = LOAD_CLIENTS // LOAD_PROCESSES
    # Worker processes, so that the clients are not held to one core by the GIL.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(LOAD_PROCESSES, mp_context=context) as pool:
        for relogin in (False, True):
            counts: dict[str, list[int]] = {"direct": [], "relayed": []}
            ratios = []
            for _ in range(args.load_rounds):
                for side, d in (("direct", direct), ("relayed", relayed)):
                    jobs = [
                        pool.submit(
                            load_worker,
                            d.host,
                            d.imap_port,
                            per_process,
                            args.load_seconds,
                            relogin,
                        )
                        for _ in range(LOAD_PROCESSES)
                    ]
                    counts[side].append(sum(job.result() for job in jobs))
                ratios.append(counts["relayed"][-1] / counts["direct"][-1])
            mode = (
                f"logging in every {COMMANDS_PER_LOGIN} commands" if relogin else "one session each"
            )
            name = f"Dovecot {version}: {LOAD_CLIENTS} clients, {mode}"
            for side in ("direct", "relayed"):
                rate = statistics.median(counts[side]) / args.load_seconds
                rows.append((f"{name}, {side}", f"{rate:.0f} commands/s", ""))
            ratio = statistics.median(ratios)
            rows.append(
                (
                    f"{name}, relayed/direct",
                    f"{ratio:.2f}",
                    f"rounds {', '.join(f'{r:.2f}' for r in ratios)}; "
                    + ratio_note(ratio, TARGET_LOAD_RATIO, True),
                )
            )
    return rows


async def version_rows(pki, version: str, args: argparse.Namespace) -> list[Row]:
    """Logins and load on Dovecot `version`: relayed against direct, side by side."""
    async with run_stack(
        pki, {"log_level": "warning"}, version=version, dovecot_conf=LOAD_CONF
    ) as stack:
        exec_only = stack.root / "exec-only.py"
        exec_only.write_text(EXEC_ONLY)
        hooks = {
            "/usr/bin/env": "/usr/bin/env",
            "a Python that only execs": f"{SYSTEM_PYTHON} -I -S {exec_only}",
        }
        with contextlib.ExitStack() as dovecots:
            direct = dovecots.enter_context(running_dovecot(version=version, extra_conf=LOAD_CONF))
            sides = {"direct": direct}
            for name, helper in hooks.items():
                conf = hook_conf(version, helper)
                sides[name] = dovecots.enter_context(
                    running_dovecot(version=version, extra_conf=conf)
                )
            relayed = sides["relayed"] = stack.dovecot

            def measure_both() -> list[Row]:
                for d in (direct, relayed):
                    seed_load_mailbox(d)
                rows = login_rows(version, sides, args.logins)
                return rows + load_rows(version, direct, relayed, args)

            return await trio.to_thread.run_sync(measure_both)


def open_session(dovecot: Dovecot, tls: bool) -> Session:
    context = dovecot.client_ssl_context() if tls else None
    port = dovecot.imaps_port if tls else dovecot.imap_port
    session, _ = login(dovecot.host, port, context)
    session.command("SELECT INBOX")
    return session


def alternate(
    direct: Callable[[], float], relayed: Callable[[], float], rounds: int
) -> tuple[float, float]:
    """Median of each, taken turn about: load from elsewhere hits both alike."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        times[0].append(direct())
        times[1].append(relayed())
    return statistics.median(times[0]), statistics.median(times[1])


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def idle_memory(stack: Stack, count: int, deadline: float) -> tuple[int, int, float]:
    """(connections held, bytes of relay RSS per connection, seconds to open them)."""
    pid = stack.service.process.pid
    relay_socket = stack.settings["relay_socket"]
    # Warm up, so that one-off allocations are not counted per connection.
    warm = [hand_over(relay_socket) for _ in range(50)]
    if not relays(warm[-1]):
        raise RuntimeError("a handed-over connection does not relay")
    before = rss(pid)
    held: list[tuple[socket.socket, socket.socket]] = []
    started = time.monotonic()
    try:
        while len(held) < count and time.monotonic() < deadline:
            held.append(hand_over(relay_socket))
        opened = time.monotonic() - started
        # Every one is really relayed: the last one forwards a command.
        if not relays(held[-1]):
            raise RuntimeError("a handed-over connection does not relay")
        per_connection = (rss(pid) - before) // len(held)
    finally:
        for pair in warm + held:
            for end in pair:
                end.close()
    return len(held), per_connection, opened


def ratio_note(value: float, target: float, higher_is_better: bool) -> str:
    met = value >= target if higher_is_better else value <= target
    sign = "≥" if higher_is_better else "≤"
    return f"target {sign} {target:g}: " + ("met" if met else "NOT met")


async def measure(args: argparse.Namespace) -> None:
    deadline = time.monotonic() + TIME_LIMIT
    size = int(args.fetch_mb * 1024 * 1024)
    data = message(size)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-pki-") as pki_dir:
        pki = make_test_pki(Path(pki_dir))
        for version in args.versions.split(","):
            rows += await version_rows(pki, version, args)
        async with run_stack(pki, {"log_level": "warning"}, version=None) as stack:
            with running_dovecot() as direct:
                relayed = stack.dovecot
                for d in (relayed, direct):
                    await append(d, data)

                relay_pid = (stack.relay or stack.service).process.pid

                def compare() -> None:
                    for tls in (False, True):
                        sessions = [open_session(d, tls) for d in (direct, relayed)]
                        meters = [
                            CpuMeter(sessions[0], dovecot_pids(direct), []),
                            CpuMeter(sessions[1], dovecot_pids(relayed), [relay_pid]),
                        ]
                        # The first FETCH of a session also grows socket buffers and
                        # warms caches, on both sides alike: steady state is measured.
                        for session in sessions:
                            fetch_seconds(session)
                        d_s, r_s = alternate(*(m.fetch for m in meters), args.fetch_runs)
                        for session in sessions:
                            session.close()
                        mode = "TLS" if tls else "plain"
                        name = f"FETCH {args.fetch_mb:g} MB, {mode}"
                        rows.append((f"{name}, direct", f"{size / d_s / 1e6:.0f} MB/s", ""))
                        rows.append((f"{name}, relayed", f"{size / r_s / 1e6:.0f} MB/s", ""))
                        ratio = d_s / r_s
                        rows.append(
                            (
                                f"FETCH {mode} relayed/direct",
                                f"{ratio:.2f}",
                                ratio_note(ratio, TARGET_THROUGHPUT_RATIO, True),
                            )
                        )
                        for side, meter in zip(("direct", "relayed"), meters, strict=True):
                            rows.append((f"{name}, {side}: CPU per FETCH", meter.summary(), ""))
                        cpu_ratio = meters[0].server_ms() / meters[1].server_ms()
                        rows.append(
                            (
                                f"FETCH {mode} server CPU (Dovecot + relay) direct/relayed",
                                f"{cpu_ratio:.2f}",
                                "the ratio on a server whose CPUs are saturated",
                            )
                        )

                    sessions = [open_session(d, False) for d in (direct, relayed)]
                    d_s, r_s = alternate(*(partial(noop_seconds, s) for s in sessions), args.noops)
                    for session in sessions:
                        session.close()
                    added = (r_s - d_s) * 1000
                    rows.append(("NOOP round trip, direct (median)", f"{d_s * 1000:.3f} ms", ""))
                    rows.append(("NOOP round trip, relayed (median)", f"{r_s * 1000:.3f} ms", ""))
                    rows.append(
                        (
                            "added per command",
                            f"{added:.3f} ms",
                            ratio_note(added, TARGET_ADDED_COMMAND_MS, False),
                        )
                    )

                await trio.to_thread.run_sync(compare)

            held, per_connection, opened = await trio.to_thread.run_sync(
                idle_memory, stack, args.connections, deadline
            )
            rows.append(
                (
                    f"relay memory per idle connection ({held} open)",
                    f"{per_connection / 1024:.1f} KB",
                    ratio_note(per_connection / 1024, TARGET_BYTES_PER_CONNECTION / 1024, False),
                )
            )
            rows.append((f"time to hand over {held} connections", f"{opened:.1f} s", ""))
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print_table(
        f"Post-login relay vs Dovecot direct (FETCH, NOOP, memory: host Dovecot; loopback,"
        f" {os.cpu_count()} CPUs,"
        f" load average {os.getloadavg()[0]:.1f} at the end)",
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fetch-mb", type=float, default=50.0, help="size of the fetched message")
    parser.add_argument("--fetch-runs", type=int, default=15, help="FETCHes per side and mode")
    parser.add_argument("--noops", type=int, default=2000, help="NOOP round trips per side")
    parser.add_argument("--logins", type=int, default=200, help="logins per side and version")
    parser.add_argument(
        "--versions", default="2.3,2.4", help="Dovecot versions for the login and load figures"
    )
    parser.add_argument(
        "--load-seconds", type=float, default=4.0, help="seconds per side and round of load"
    )
    parser.add_argument("--load-rounds", type=int, default=3, help="rounds of load per mode")
    parser.add_argument(
        "--connections", type=int, default=5000, help="idle connections handed to the relay"
    )
    args = parser.parse_args(argv)
    trio.run(measure, args)


if __name__ == "__main__":
    main()
