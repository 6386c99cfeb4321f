"""Benchmark: what the Lua driver script costs an LMTP delivery, in one run.

One Dovecot, one LMTP connection, and users who differ only in their push
driver, set per user by userdb fields (facts.md §7: separate Dovecot instances
differ from each other by up to ±0.15 whatever the driver):

- none:   no push_notification plugins at all;
- empty:  the Lua driver with a script that only opens and closes transactions
          (a truly empty file makes the driver fail every delivery);
- hooks:  the Lua driver with the same hooks as dovenotify's script, doing nothing;
- script: the Lua driver with dovenotify's script, installed as
          `dovecot-config --install` installs it, appending to the event spool
          made as the service makes it (a file for the mail uid), read after
          each delivery.

Deliveries rotate across the users, one round after another, each round
starting one further along (none, empty, hooks, script; then empty, hooks,
script, none; ...): whatever else the machine does falls on all of them alike,
and no user always comes first. The ratios are medians of the ratios within
each round. The target: the script adds at most 0.03 to the ratio of the hooks
that do nothing, which is what the C plugin costs (issue #15).

Beside each time: the CPU the lmtp process spent on the whole transaction
(/proc/PID/schedstat, in ns), and its ratio in the same way. On a machine busy
with other work the times swing by ±0.1 between runs; the CPU figures much less.

`--compare NAME=PATH` adds another driver script to the rounds, e.g. the
script of an earlier commit, so a change is measured before and after in the
same run. Dovecot's mail user must be able to read it where it is, and
Dovecot 2.4 running from the test chroot sees only /tmp of the host:

    git show HEAD~1:dovenotify/dovecot/dovenotify.lua > /tmp/before.lua
    python -m scripts.bench_lua --compare before=/tmp/before.lua

    python -m scripts.bench_lua [--deliveries 300] [--dovecot-version 2.3|2.4]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import smtplib
import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import attrs

from dovenotify.dovecot.config import PLUGINS
from dovenotify.dovecot.files import install_dovecot_files
from scripts.bench_table import print_table
from tests.harness.dovecot import (
    MAIL_USER,
    Dovecot,
    EventSink,
    SpoolSink,
    installation,
    make_root,
    running_dovecot,
)

MESSAGE = (
    b"From: a@example.org\r\nTo: alice@example.org\r\nSubject: benchmark\r\n"
    b"Message-ID: <bench@example.org>\r\n\r\n" + b"a line of text in the body\r\n" * 40
)
TARGET = 0.03
# The least a script must define (without a transaction hook the driver fails
# every delivery with "Missing function"); no event hooks, so Dovecot collects none.
EMPTY = (
    "function dovecot_lua_notify_begin_txn(user) return {} end\n"
    "function dovecot_lua_notify_end_txn(ctx, success) end\n"
)
# The same hooks as dovenotify.lua, doing nothing: Dovecot registers the same
# events and builds the same event tables, so the difference is the script's work.
HOOKS_ONLY = "function script_init() return 0 end\n" + "".join(
    f"function dovecot_lua_notify_{hook}(ctx, event) return {{}} end\n"
    for hook in (
        "begin_txn",
        "end_txn",
        *(
            f"event_{name}"
            for name in (
                "message_new",
                "message_append",
                "message_expunge",
                "flags_set",
                "flags_clear",
                "mailbox_delete",
                "mailbox_rename",
            )
        ),
    )
)
BUILT_IN = ("none", "empty", "hooks", "script", "flush")
FLUSH = "flush"
WARMUP = 10
# Seconds after a delivery by which its event has certainly reached the listener.
SILENT = 1.0


def driver_fields(version: str, script: Path) -> dict[str, str]:
    """userdb fields that give one user the Lua driver with `script`."""
    # Commas: passwd-file separates extra fields with spaces.
    fields = {"mail_plugins": ",".join(PLUGINS)}
    if version == "2.3":
        fields["push_notification_driver"] = f"lua:file={script}"
    else:
        fields["push_notification/lua/lua_file"] = str(script)
    return fields


def settings_conf(version: str, root: Path, script: Path) -> str:
    """dovenotify's settings, as the shipped snippet sets them, for every user."""
    settings = (
        f"dovenotify_socket = {root / 'events.sock'}\n"
        "dovenotify_timeout = 0.2\n"
        f"dovenotify_spool = {root / 'events.spool'}\n"
    )
    if version == "2.3":
        return f"plugin {{\n{settings}}}\n"
    return f"push_notification lua {{\nlua_file = {script}\nlua_settings {{\n{settings}}}\n}}\n"


def received(sink: EventSink, spooled: SpoolSink, user: str) -> int:
    return sum(line.startswith(f"MessageNew\t{user}\t") for line in [*sink.lines, *spooled.lines])


def await_event(sink: EventSink, spooled: SpoolSink, count: int) -> None:
    """Until `count` transactions' events have come, in the spool or on the socket."""
    deadline = time.monotonic() + SILENT
    while len(spooled.lines) + len(sink.payloads) < count:
        spooled.poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"no event within {SILENT} s")
        time.sleep(0.0005)


def descendants(pid: int, comm: str) -> list[int]:
    """Processes named `comm` below `pid` (the chroot's Dovecot is not its child)."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # comm may hold spaces and parentheses: split after its closing one
                head, _, tail = (entry / "stat").read_text().rpartition(")")
                names[int(entry.name)] = head.partition("(")[2]
                parents[int(entry.name)] = int(tail.split()[1])

    def below(p: int) -> bool:
        while p > 1:
            p = parents.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p, name in names.items() if name == comm and below(p)]


def cpu_ns(pids: list[int]) -> int:
    """CPU time the processes have used, in ns (schedstat: exact, unlike clock ticks)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return total


class Lmtp:
    """One LMTP connection for every delivery: each transaction is a fresh mail user."""

    def __init__(self, d: Dovecot) -> None:
        self.client = smtplib.LMTP(d.host, d.lmtp_port, timeout=10)
        self.client.noop()
        # The process serving this connection: its CPU per delivery is a second
        # measure, less shaken by the machine's load than the time.
        self.processes = descendants(d.pid, "lmtp")

    def deliver(self, rcpt: str) -> tuple[float, int]:
        """Seconds from DATA to the final reply, and the lmtp CPU ns of the whole transaction."""
        cpu = cpu_ns(self.processes)
        code, reply = self.client.mail("sender@example.org")
        assert code == 250, (code, reply)
        code, reply = self.client.rcpt(rcpt)
        assert code == 250, (code, reply)
        start = time.perf_counter()
        code, reply = self.client.data(MESSAGE)
        elapsed = time.perf_counter() - start
        assert code == 250, (code, reply)
        return elapsed, cpu_ns(self.processes) - cpu

    def close(self) -> None:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            self.client.quit()
        self.client.close()


def measure(deliveries: int, version: str | None, compare: Mapping[str, Path]) -> None:
    root = make_root("dovenotify-bench-lua-")
    try:
        install_dovecot_files(root / "files")
        scripts = {"script": root / "files" / "dovenotify.lua"}
        for name, text in (("empty", EMPTY), ("hooks", HOOKS_ONLY)):
            scripts[name] = root / f"{name}.lua"
            scripts[name].write_text(text)
        for path in scripts.values():
            path.chmod(0o644)
        # In place: a script may load files beside it, as dovenotify.lua does.
        scripts |= {name: path.resolve() for name, path in compare.items()}
        names = ["none", *scripts]
        with contextlib.ExitStack() as stack:
            version = installation(version).version
            d = stack.enter_context(
                running_dovecot(
                    version=version,
                    users=dict.fromkeys([*names, FLUSH], "secret"),
                    userdb_fields={
                        name: driver_fields(version, path) for name, path in scripts.items()
                    },
                    extra_conf=settings_conf(version, root, scripts["script"]),
                )
            )
            # dovenotify.lua appends to the spool; a compared script of an
            # older dovenotify may send to the socket.
            spooled = SpoolSink(root / "events.spool", [d.installation.uid(MAIL_USER)])
            sink = stack.enter_context(EventSink(root / "events.sock"))
            lmtp = Lmtp(d)
            stack.callback(lmtp.close)
            times: dict[str, list[Sample]] = {name: [] for name in names}
            cpu: dict[str, list[Sample]] = {name: [] for name in names}
            # The listener takes each event before the next delivery starts, or
            # the user after a sending one would pay for the listener's work.
            senders, sent = {"script", *compare}, 0
            for i in range(WARMUP + deliveries):
                first = i % len(names)
                for name in names[first:] + names[:first]:
                    elapsed, used = lmtp.deliver(name)
                    # Dovecot finishes a delivery's mail user (closing its Lua
                    # state) during the next transaction on the connection: a
                    # delivery to a user without a driver follows each one, and
                    # what it takes more than after no driver counts too.
                    flushed, flush_used = lmtp.deliver(FLUSH)
                    if i >= WARMUP:
                        times[name].append(Sample(elapsed, elapsed + flushed))
                        cpu[name].append(Sample(used / 1e9, (used + flush_used) / 1e9))
                    if name in senders:
                        sent += 1
                        try:
                            await_event(sink, spooled, sent)
                        except AssertionError:
                            if name == "script":
                                raise
                            # A compared script that sends nothing.
                            senders.discard(name)
                            sent -= 1
            events = {name: received(sink, spooled, name) for name in ("script", *compare)}
            problems = [line for line in d.log_text().splitlines() if "dovenotify:" in line]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report(version, deliveries, times, cpu, events, len(problems), compare)


@attrs.frozen
class Sample:
    """One delivery's figure alone, and with the flush delivery after it."""

    alone: float
    with_flush: float


def round_ratios(values: Mapping[str, list[Sample]]) -> dict[str, float]:
    """Per user, the median over rounds of 1 + (its delivery and flush - no driver's
    delivery and flush) / no driver's delivery: the deliveries of a round are back to
    back, so a busy moment of the machine falls on all of them alike."""
    return {
        name: statistics.median(
            1 + (v.with_flush - n.with_flush) / n.alone if n.alone else 1.0
            for v, n in zip(own, values["none"], strict=True)
        )
        for name, own in values.items()
    }


def report(
    version: str,
    deliveries: int,
    times: Mapping[str, list[Sample]],
    cpu: Mapping[str, list[Sample]],
    events: Mapping[str, int],
    problems: int,
    compare: Mapping[str, Path],
) -> None:
    ratio, cpu_ratio = round_ratios(times), round_ratios(cpu)
    added = ratio["script"] - ratio["hooks"]
    verdict = "within" if added <= TARGET else "OVER"
    labels = {
        "none": "no push driver",
        "empty": "Lua driver, empty script",
        "hooks": "Lua driver, hooks that do nothing",
        "script": "Lua driver, dovenotify.lua",
        **{name: f"{name} ({path.name})" for name, path in compare.items()},
    }

    def row(name: str) -> tuple[str, str, str]:
        return (
            labels[name],
            f"{statistics.median(t.alone for t in times[name]) * 1000:.2f} ms",
            f"{ratio[name]:.3f}   lmtp CPU "
            f"{statistics.median(c.alone for c in cpu[name]) * 1e6:.0f} us ({cpu_ratio[name]:.3f})",
        )

    print_table(
        f"LMTP delivery on Dovecot {version}: one Dovecot, drivers per user, "
        f"{deliveries} deliveries each, rotating, medians (ratio to no driver)",
        [
            *(row(name) for name in labels),
            (
                "script vs hooks that do nothing",
                f"{added:+.3f}",
                f"{verdict} the target of +{TARGET}; "
                f"lmtp CPU {cpu_ratio['script'] - cpu_ratio['hooks']:+.3f}",
            ),
            *(
                (
                    f"{name} vs hooks that do nothing",
                    f"{ratio[name] - ratio['hooks']:+.3f}",
                    f"lmtp CPU {cpu_ratio[name] - cpu_ratio['hooks']:+.3f}",
                )
                for name in ("empty", *compare)
            ),
            (
                "events received",
                " ".join(str(count) for count in events.values()),
                f"({', '.join(events)}); driver warnings: {problems}",
            ),
        ],
    )


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name.isidentifier() or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of a Lua script, not {text!r}")
    if name in BUILT_IN:
        raise argparse.ArgumentTypeError(f"{name!r} names a built-in row; choose another name")
    return name, Path(path)


def parser_comparing(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser with `--compare NAME=PATH`."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--compare",
        type=_named_path,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another driver script to measure in the same rounds (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = parser_comparing(__doc__)
    parser.add_argument("--deliveries", type=int, default=300, help="per user")
    parser.add_argument(
        "--dovecot-version", choices=("2.3", "2.4"), help="default: the host's Dovecot"
    )
    args = parser.parse_args(argv)
    measure(args.deliveries, args.dovecot_version, dict(args.compare))


if __name__ == "__main__":
    main()
