"""Benchmark: what the Lua driver script costs an LMTP delivery, in one run.

Four Dovecots of the same version side by side, identical but for the push
driver:

- none:   no push_notification plugins at all;
- empty:  the Lua driver with a script that only opens and closes transactions
          (a truly empty file makes the driver fail every delivery);
- hooks:  the Lua driver with the same hooks as dovenotify's script, doing nothing;
- script: the Lua driver with dovenotify's script and a listener reading it.

Deliveries alternate between the four, one round after another, each round
starting one further along (none, empty, hooks, script; then empty, hooks,
script, none; ...): whatever else the machine does falls on all of them alike,
and no configuration always comes first (the first of a round was measured up
to 20% slower). The ratios are medians of the ratios within each round. The
target: the script adds at most 0.03 to the empty script's ratio to no driver.

`--compare NAME=PATH` adds another driver script to the rounds, e.g. the
script of an earlier commit, so a change is measured before and after in the
same run:

    git show HEAD~1:dovenotify/dovecot/dovenotify.lua > /tmp/before.lua
    python -m scripts.bench_lua --compare before=/tmp/before.lua

    python -m scripts.bench_lua [--deliveries 300] [--dovecot-version 2.3|2.4]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
from pathlib import Path

import dovenotify
from dovenotify.dovecot.config import render
from scripts.bench_table import print_table
from tests.harness.dovecot import EventSink, deliver, make_root, running_dovecot

SCRIPT = Path(dovenotify.__file__).parent / "dovecot" / "dovenotify.lua"
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
WARMUP = 10


def driver_conf(version: str, root: Path, script: Path) -> str:
    # The post-login helper is not on the LMTP path: a pass-through stands in.
    helper = root / "pass-through.sh"
    helper.write_text(
        '#!/bin/sh\nwhile [ "$#" -gt 0 ]; do case "$1" in --*) shift 2 ;;'
        ' *) break ;; esac; done\nexec "$@"\n'
    )
    helper.chmod(0o755)
    return render(
        version,
        lua_script=script,
        event_socket=root / "events.sock",
        event_timeout=0.2,
        helper_command=[str(helper)],
        relay_socket=root / "relay.sock",
        relay_timeout=0.5,
        event_spool=root / "events.spool",
    )


def measure(deliveries: int, version: str | None, compare: dict[str, Path]) -> None:
    scripts = {"empty": EMPTY, "hooks": HOOKS_ONLY, "script": SCRIPT.read_text()}
    scripts |= {name: path.read_text() for name, path in compare.items()}
    listening = ["script", *compare]
    roots = {name: make_root(f"dovenotify-bench-lua-{name}-") for name in scripts}
    try:
        for name, text in scripts.items():
            (roots[name] / "driver.lua").write_text(text)
            (roots[name] / "driver.lua").chmod(0o644)
        with contextlib.ExitStack() as stack:
            instances = {"none": stack.enter_context(running_dovecot(version=version))}
            version = instances["none"].version
            for name, root in roots.items():
                conf = driver_conf(version, root, root / "driver.lua")
                instances[name] = stack.enter_context(
                    running_dovecot(version=version, extra_conf=conf)
                )
            sinks = [
                stack.enter_context(EventSink(roots[name] / "events.sock")) for name in listening
            ]
            times: dict[str, list[float]] = {name: [] for name in instances}
            names = list(instances)
            for i in range(WARMUP + deliveries):
                first = i % len(names)
                for name in names[first:] + names[:first]:
                    elapsed = deliver(instances[name], "alice", MESSAGE)
                    if i >= WARMUP:
                        times[name].append(elapsed)
            for sink in sinks:
                sink.wait_for(lambda s: len(s.lines) >= WARMUP + deliveries)
            problems = [
                line
                for name in listening
                for line in instances[name].log_text().splitlines()
                if "dovenotify:" in line
            ]
    finally:
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)

    medians = {name: statistics.median(values) for name, values in times.items()}
    # Ratios within each round (the four deliveries back to back), then their
    # median: a busy moment of the machine falls on all four alike.
    ratio = {
        name: statistics.median(t / n for t, n in zip(values, times["none"], strict=True))
        for name, values in times.items()
    }
    added = ratio["script"] - ratio["empty"]
    verdict = "within" if added <= TARGET else "OVER"
    print_table(
        f"LMTP delivery on Dovecot {version}: {deliveries} deliveries each, alternating, medians",
        [
            ("no push driver", f"{medians['none'] * 1000:.2f} ms", "1.000"),
            (
                "Lua driver, empty script",
                f"{medians['empty'] * 1000:.2f} ms",
                f"{ratio['empty']:.3f}",
            ),
            (
                "Lua driver, hooks that do nothing",
                f"{medians['hooks'] * 1000:.2f} ms",
                f"{ratio['hooks']:.3f}  (Dovecot collects the events)",
            ),
            (
                "Lua driver, dovenotify.lua",
                f"{medians['script'] * 1000:.2f} ms",
                f"{ratio['script']:.3f}",
            ),
            ("script vs empty script", f"{added:+.3f}", f"{verdict} the target of +{TARGET}"),
            (
                "script vs hooks that do nothing",
                f"{ratio['script'] - ratio['hooks']:+.3f}",
                "what the script's own work costs",
            ),
            *(
                (
                    f"{name} ({compare[name].name})",
                    f"{medians[name] * 1000:.2f} ms",
                    f"{ratio[name]:.3f}  ({ratio[name] - ratio['empty']:+.3f} vs empty script)",
                )
                for name in compare
            ),
            (
                "events received",
                " ".join(str(len(sink.lines)) for sink in sinks),
                f"driver warnings: {len(problems)}",
            ),
        ],
    )


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"expected NAME=PATH of a Lua script, not {text!r}")
    if name in ("none", "empty", "hooks", "script"):
        raise argparse.ArgumentTypeError(f"{name!r} names a built-in row; choose another name")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--deliveries", type=int, default=300, help="per configuration")
    parser.add_argument(
        "--dovecot-version", choices=("2.3", "2.4"), help="default: the host's Dovecot"
    )
    parser.add_argument(
        "--compare",
        type=_named_path,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="another driver script to measure in the same rounds (repeatable)",
    )
    args = parser.parse_args(argv)
    measure(args.deliveries, args.dovecot_version, dict(args.compare))


if __name__ == "__main__":
    main()
