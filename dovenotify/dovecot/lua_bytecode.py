"""Precompile the Lua driver with the very Lua library this machine's Dovecot links.

Dovecot compiles its push_notification script into a fresh Lua state for every
mail user (every LMTP delivery), and compiling code was most of what the script
cost a delivery. So dovenotify.lua is a small forwarder, and the driver's code
is loaded as bytecode. Lua bytecode is meant for the Lua that made it (Debian 12
and 13 ship different Lua 5.4 releases), so it is made here, on the machine, by
the library libdovecot-lua names, called through ctypes: no Lua interpreter is
needed.

Lua checks a chunk's version and number formats when it loads it: bytecode of
another Lua is refused, and dovenotify.lua then loads the source.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterable
from pathlib import Path

# Where distributions put Dovecot's Lua glue library (Debian/Ubuntu, Fedora/RHEL).
DOVECOT_LUA_GLUE = (
    Path("/usr/lib/dovecot/libdovecot-lua.so.0"),
    Path("/usr/lib64/dovecot/libdovecot-lua.so.0"),
)
# A DT_NEEDED entry in the glue library's string table: NUL-delimited.
_LUA_NEEDED = re.compile(rb"\0(lib(?:lua|luajit)[\w.+-]*\.so(?:\.\d+)*)\0")

_WRITER = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)


class BytecodeError(Exception):
    """The driver could not be precompiled; the message says why."""


def dovecot_lua_library(glue: Iterable[Path] = DOVECOT_LUA_GLUE) -> str:
    """The Lua library Dovecot loads, as named in its glue library (e.g. liblua5.4.so.0)."""
    for path in glue:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        match = _LUA_NEEDED.search(data)
        if match:
            return match[1].decode()
        raise BytecodeError(f"{path} names no Lua library")
    raise BytecodeError("Dovecot's Lua support (libdovecot-lua.so.0) is not installed")


def _api(library: str) -> ctypes.CDLL:
    try:
        lua = ctypes.CDLL(library)
    except OSError as e:
        raise BytecodeError(f"cannot load {library}: {e}") from None
    lua.luaL_newstate.restype = ctypes.c_void_p
    lua.luaL_newstate.argtypes = []
    lua.luaL_loadbufferx.restype = ctypes.c_int
    lua.luaL_loadbufferx.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_char_p,
    ]
    lua.lua_tolstring.restype = ctypes.c_char_p
    lua.lua_tolstring.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lua.lua_dump.restype = ctypes.c_int
    lua.lua_dump.argtypes = [ctypes.c_void_p, _WRITER, ctypes.c_void_p, ctypes.c_int]
    lua.lua_close.restype = None
    lua.lua_close.argtypes = [ctypes.c_void_p]
    return lua


def _dump(lua: ctypes.CDLL, state: int) -> bytes | None:
    """The function on top of the stack as string.dump(f, true) gives it; None on failure."""
    parts: list[bytes] = []

    def write(_state: int, data: int, size: int, _user: int) -> int:
        parts.append(ctypes.string_at(data, size))
        return 0

    return None if lua.lua_dump(state, _WRITER(write), None, 1) else b"".join(parts)


def compile_chunk(library: str, name: str, source: bytes) -> bytes:
    """`source` compiled by `library`, dumped as string.dump(f, true) dumps it."""
    lua = _api(library)
    state = lua.luaL_newstate()
    if not state:
        raise BytecodeError(f"{library}: cannot create a Lua state (out of memory)")
    try:
        # Mode "t": only source text is compiled, never bytecode handed in.
        if lua.luaL_loadbufferx(state, source, len(source), f"={name}".encode(), b"t"):
            message = (lua.lua_tolstring(state, -1, None) or b"?").decode(errors="replace")
            raise BytecodeError(f"{library} cannot compile {name}: {message}")
        dump = _dump(lua, state)
        if dump is None:
            raise BytecodeError(f"{library} cannot dump {name}")
        return dump
    finally:
        lua.lua_close(state)


DRIVER = "dovenotify-driver.lua"
BYTECODE = DRIVER + "c"


def install_bytecode(directory: Path, library: str | None = None) -> bool:
    """Precompile the driver installed in `directory`; whether the bytecode changed.

    Raises BytecodeError, saying why, when it cannot, after removing older bytecode.
    """
    target = directory / BYTECODE
    try:
        source = (directory / DRIVER).read_bytes()
        data = compile_chunk(library or dovecot_lua_library(), DRIVER, source)
    except (BytecodeError, OSError) as e:
        # Bytecode of an older driver would otherwise be loaded in place of the new source.
        target.unlink(missing_ok=True)
        raise BytecodeError(str(e)) from None
    if target.is_file() and target.read_bytes() == data:
        return False
    partial = target.with_name(target.name + ".new")
    partial.write_bytes(data)
    partial.chmod(0o644)
    partial.replace(target)
    return True
