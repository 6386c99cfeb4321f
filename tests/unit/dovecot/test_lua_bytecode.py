"""Precompiling the Lua driver: finding Dovecot's Lua, compiling, and what install leaves."""

from __future__ import annotations

import ctypes.util
import shutil
from pathlib import Path

import pytest

import dovenotify
from dovenotify.dovecot.lua_bytecode import (
    BYTECODE,
    DRIVER,
    BytecodeError,
    compile_chunk,
    dovecot_lua_library,
    install_bytecode,
)

SOURCES = Path(dovenotify.__file__).parent / "dovecot"
HOST_LUA = "liblua5.4.so.0"
needs_lua = pytest.mark.skipif(
    ctypes.util.find_library("lua5.4") is None, reason="needs liblua5.4 (Dovecot's Lua on Debian)"
)


def glue(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "libdovecot-lua.so.0"
    path.write_bytes(content)
    return path


def test_the_lua_library_is_the_one_dovecot_names(tmp_path):
    # What a DT_NEEDED entry looks like in the glue library's string table.
    path = glue(tmp_path, b"\x7fELF...\0libdovecot.so.0\0liblua5.4.so.0\0libc.so.6\0")
    assert dovecot_lua_library([tmp_path / "absent.so", path]) == "liblua5.4.so.0"


def test_luajit_is_found_too(tmp_path):
    path = glue(tmp_path, b"\0libluajit-5.1.so.2\0libc.so.6\0")
    assert dovecot_lua_library([path]) == "libluajit-5.1.so.2"


def test_without_dovecot_lua_the_reason_says_so(tmp_path):
    with pytest.raises(BytecodeError, match=r"Dovecot's Lua support .* is not installed"):
        dovecot_lua_library([tmp_path / "absent.so"])
    path = glue(tmp_path, b"\0libdovecot.so.0\0libc.so.6\0")
    with pytest.raises(BytecodeError, match=r"names no Lua library"):
        dovecot_lua_library([path])


DRIVER_SOURCE = (SOURCES / DRIVER).read_bytes()


def test_a_library_that_does_not_load_is_named():
    with pytest.raises(BytecodeError, match=r"cannot load liblua9\.9\.so\.0"):
        compile_chunk("liblua9.9.so.0", DRIVER, DRIVER_SOURCE)


@needs_lua
def test_a_syntax_error_names_the_file_and_line():
    with pytest.raises(BytecodeError, match=r"cannot compile x\.lua: x\.lua:2: "):
        compile_chunk(HOST_LUA, "x.lua", b"local a = 1\nlocal = 2\n")


@needs_lua
def test_the_driver_is_lua_bytecode_without_debug_information():
    bytecode = compile_chunk(HOST_LUA, DRIVER, DRIVER_SOURCE)
    assert bytecode.startswith(b"\x1bLua\x54")
    # Stripped, as string.dump(f, true): no local names.
    assert b"make_settings" not in bytecode


@needs_lua
def test_install_writes_the_driver_bytecode(tmp_path):
    shutil.copyfile(SOURCES / DRIVER, tmp_path / DRIVER)
    assert install_bytecode(tmp_path, HOST_LUA) is True
    assert (tmp_path / BYTECODE).read_bytes() == compile_chunk(HOST_LUA, DRIVER, DRIVER_SOURCE)
    assert (tmp_path / BYTECODE).stat().st_mode & 0o777 == 0o644
    # Unchanged, so `setup` does not report it again.
    assert install_bytecode(tmp_path, HOST_LUA) is False


def test_failed_install_removes_older_bytecode(tmp_path):
    # Bytecode of an older driver must not run in place of the new source.
    shutil.copyfile(SOURCES / DRIVER, tmp_path / DRIVER)
    (tmp_path / BYTECODE).write_bytes(b"\x1bLua old driver")
    with pytest.raises(BytecodeError, match=r"liblua9\.9\.so\.0"):
        install_bytecode(tmp_path, "liblua9.9.so.0")
    assert not (tmp_path / BYTECODE).exists()
