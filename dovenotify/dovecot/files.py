"""The files Dovecot runs (Lua driver, post-login helper) and its snippet, for a configuration."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from dovenotify.core import config as configuration
from dovenotify.dovecot import config as dovecot_config
from dovenotify.dovecot import lua_bytecode

DOVECOT_FILES = (
    "dovenotify.lua",
    "dovenotify-driver.lua",
    "dovenotify-fallback.lua",
    "dovenotify-loader.lua",
    "postlogin.py",
)
# Shipped as package data beside this module.
SOURCE = Path(__file__).parent


def dovecot_snippet(config: configuration.Config, version: str) -> str:
    """Dovecot's configuration for `config`, in the syntax of Dovecot `version`."""
    files = config.dovecot_files
    return dovecot_config.render(
        version,
        lua_script=files / "dovenotify.lua",
        event_socket=config.event_socket,
        event_timeout=config.event_timeout,
        helper_command=[str(config.helper_python), "-I", "-S", str(files / "postlogin.py")],
        relay_socket=config.relay_socket,
        relay_timeout=config.relay_timeout,
        user_field=config.user_lookup,
        event_spool=config.event_spool,
        relay_only_field=config.relay_only_field,
        event_spool_size=config.event_spool_size,
    )


def install_dovecot_files(directory: Path) -> list[Path]:
    """Copy the Lua scripts and helper where Dovecot's unprivileged users can read them,
    and precompile the Lua driver; return the files that changed."""
    if directory.exists() and not directory.is_dir():
        # A ValueError: the CLI prints it as it prints a usage error.
        raise ValueError(f"dovecot_files {directory} is a file; it must name a directory")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    changed = []
    for name in DOVECOT_FILES:
        target = directory / name
        if not target.is_file() or target.read_bytes() != (SOURCE / name).read_bytes():
            shutil.copyfile(SOURCE / name, target)
            changed.append(target)
        target.chmod(0o644)
    try:
        if lua_bytecode.install_bytecode(directory):
            changed.append(directory / lua_bytecode.BYTECODE)
    except lua_bytecode.BytecodeError as e:
        print(
            f"dovenotify: the Lua driver is not precompiled ({e}); "
            "Dovecot compiles it for every mail delivery instead, which is slower",
            file=sys.stderr,
        )
    return changed
