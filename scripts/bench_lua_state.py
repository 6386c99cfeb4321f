"""Benchmark: what a Lua driver script costs one delivery's Lua state, without Dovecot.

`scripts/bench lua` measures real deliveries, whose time swings by ±0.1 of a
ratio when other work shares the machine. This emulates, with the Lua library
Dovecot links (through ctypes), what the push_notification Lua driver does for
one LMTP delivery: a fresh state with the standard libraries, the script
loaded and run, script_init with 2.4-style settings, then begin_txn, one
MessageNew, end_txn (appending to a spool file made as the service makes
them; a script of an older dovenotify sends to a unix socket this process
listens on), a full garbage collection and lua_close. Scripts are measured
in rotation, and the time of each phase is given, so a change shows where it
saves.

    python -m scripts.bench_lua_state [--rounds 3000] [--compare NAME=PATH]...
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from dovenotify.dovecot.files import install_dovecot_files
from dovenotify.dovecot.lua_bytecode import dovecot_lua_library
from dovenotify.events import spool
from scripts.bench_lua import HOOKS_ONLY, parser_comparing
from scripts.bench_table import print_table

PHASES = ("load script", "begin_txn", "event", "end_txn", "collect+close")
# The Dovecot API the scripts use on these paths.
PRELUDE = b"dovecot = { i_warning = function(text) io.stderr:write(text, '\\n') end }"
LUA_TFUNCTION = 6
LUA_GCCOLLECT = 2


class Lua:
    """The few C API calls an emulated driver needs."""

    def __init__(self, library: str) -> None:
        # Global: lua-socket's C module resolves the Lua API from the process.
        self.lib = lua = ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
        state, text, number = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for name, args, result in (
            ("luaL_newstate", [], state),
            ("luaL_openlibs", [state], None),
            ("luaL_loadstring", [state, text], number),
            ("luaL_loadfilex", [state, text, text], number),
            ("lua_pcallk", [state, number, number, number, state, state], number),
            ("lua_getglobal", [state, text], number),
            ("lua_createtable", [state, number, number], None),
            ("lua_pushstring", [state, text], text),
            ("lua_setfield", [state, number, text], None),
            ("lua_pushvalue", [state, number], None),
            ("lua_pushboolean", [state, number], None),
            ("lua_settop", [state, number], None),
            ("lua_gc", [state, number, number], number),
            ("lua_tolstring", [state, number, state], text),
            ("lua_close", [state], None),
        ):
            function = getattr(lua, name)
            function.argtypes, function.restype = args, result

    def call(self, state: int, nargs: int, nresults: int) -> None:
        if self.lib.lua_pcallk(state, nargs, nresults, 0, None, None):
            raise RuntimeError(self.lib.lua_tolstring(state, -1, None).decode(errors="replace"))

    def table(self, state: int, fields: Mapping[str, str]) -> None:
        self.lib.lua_createtable(state, 0, len(fields))
        for key, value in fields.items():
            self.lib.lua_pushstring(state, value.encode())
            self.lib.lua_setfield(state, -2, key.encode())


def delivery(lua: Lua, script: bytes, settings: Mapping[str, str]) -> list[int]:
    """One delivery's state; the nanoseconds of each phase."""
    c = lua.lib
    marks = [time.perf_counter_ns()]
    state = c.luaL_newstate()
    c.luaL_openlibs(state)
    for load in (
        lambda: c.luaL_loadstring(state, PRELUDE),
        lambda: c.luaL_loadfilex(state, script, None),
    ):
        if load():
            raise RuntimeError(c.lua_tolstring(state, -1, None).decode(errors="replace"))
        lua.call(state, 0, 0)
    if c.lua_getglobal(state, b"script_init") == LUA_TFUNCTION:
        lua.table(state, settings)
        lua.call(state, 1, 1)
    c.lua_settop(state, 0)
    marks.append(time.perf_counter_ns())
    c.lua_getglobal(state, b"dovecot_lua_notify_begin_txn")
    lua.table(state, {"username": "alice", "service": "lmtp", "uid": str(os.getuid())})
    lua.call(state, 1, 1)  # the context stays at index 1
    marks.append(time.perf_counter_ns())
    c.lua_getglobal(state, b"dovecot_lua_notify_event_message_new")
    c.lua_pushvalue(state, 1)
    lua.table(state, {"mailbox": "INBOX"})
    lua.call(state, 2, 0)
    marks.append(time.perf_counter_ns())
    c.lua_getglobal(state, b"dovecot_lua_notify_end_txn")
    c.lua_pushvalue(state, 1)
    c.lua_pushboolean(state, 1)
    lua.call(state, 2, 0)
    marks.append(time.perf_counter_ns())
    c.lua_settop(state, 0)
    c.lua_gc(state, LUA_GCCOLLECT, 0)
    c.lua_close(state)
    marks.append(time.perf_counter_ns())
    return [b - a for a, b in itertools.pairwise(marks)]


@contextlib.contextmanager
def listener(path: Path) -> Iterator[list[int]]:
    """A unix socket that reads every connection to its end; yields the count so far."""
    connections = [0]
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(128)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass
            connections[0] += 1

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield connections
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


def measure(rounds: int, compare: Mapping[str, Path]) -> None:
    library = dovecot_lua_library()
    lua = Lua(library)
    with tempfile.TemporaryDirectory(prefix="dovenotify-bench-lua-state-") as tmp:
        root = Path(tmp)
        install_dovecot_files(root / "files")
        (root / "hooks.lua").write_text(HOOKS_ONLY)
        scripts = {
            "hooks": root / "hooks.lua",
            "script": root / "files" / "dovenotify.lua",
            **compare,
        }
        settings = {
            "dovenotify_socket": str(root / "events.sock"),
            "dovenotify_timeout": "0.2",
            "dovenotify_spool": str(root / "events.spool"),
        }
        phases: dict[str, list[list[int]]] = {name: [] for name in scripts}
        spool.create(root / "events.spool")
        spool.provide(root / "events.spool", os.getuid())
        with listener(root / "events.sock") as connections:
            for i in range(rounds + rounds // 20):
                for name, path in scripts.items():
                    took = delivery(lua, os.fsencode(path), settings)
                    if i >= rounds // 20:  # the first 5% warm up
                        phases[name].append(took)
        spooled = (root / "events.spool" / str(os.getuid())).stat().st_size
    rows = []
    base = statistics.median(sum(p) for p in phases["hooks"])
    for name, samples in phases.items():
        total = statistics.median(sum(p) for p in samples)
        parts = "  ".join(
            f"{phase} {statistics.median(p[i] for p in samples) / 1000:.1f}"
            for i, phase in enumerate(PHASES)
        )
        rows.append((name, f"{total / 1000:.1f} us", f"{(total - base) / 1000:+.1f} us  ({parts})"))
    rows.append(("connections received", str(connections[0]), f"spooled: {spooled} bytes"))
    print_table(
        f"One delivery's Lua state, emulated with {library}: {rounds} rounds, medians "
        "(vs the hooks that do nothing; phases in us)",
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = parser_comparing(__doc__)
    parser.add_argument("--rounds", type=int, default=3000)
    args = parser.parse_args(argv)
    measure(args.rounds, dict(args.compare))


if __name__ == "__main__":
    main()
