"""The `dovenotify` command: argument parsing and output only; the work is elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from . import (
    cli_certs,
    cli_db,
    cli_devices,
    cli_doctor,
    cli_relay,
    dovecot_config,
    lua_bytecode,
    setup,
)
from . import config as configuration
from .logsetup import escape_controls
from .store import StoreError, iso, open_store
from .usernames import UserKeys

DOVECOT_FILES = ("dovenotify.lua", "dovenotify-driver.lua", "postlogin.py")


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (configuration.ConfigError, StoreError, UsageError, ValueError) as e:
        print(f"dovenotify: {escape_controls(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"dovenotify {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(
            f"dovenotify {args.command} failed: {escape_controls(_cause(e))}."
            " This is a bug in dovenotify; please report it with this line.",
            file=sys.stderr,
        )
        return 1


def _cause(e: BaseException) -> str:
    """An exception in one line: its kind and message, or a group's first one."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dovenotify", description="iOS Mail push (XAPPLEPUSHSERVICE) for Dovecot."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_command(commands, "serve", "Run the service (under supervisord or systemd).", _serve)
    cli_db.register(commands)

    devices = add_command(commands, "devices", "List registered devices.", _devices)
    devices.add_argument("--user", help="only this user's devices")
    devices.add_argument("--json", action="store_true", help="print a JSON array")
    cli_devices.register(devices)

    conf = add_command(
        commands,
        "dovecot-config",
        "Print the Dovecot configuration that enables dovenotify.",
        _dovecot,
    )
    conf.add_argument(
        "--dovecot-version",
        choices=("2.3", "2.4"),
        help="syntax to print (default: ask the installed `dovecot --version`)",
    )
    conf.add_argument(
        "--install",
        action="store_true",
        help="also copy the Lua script and the post-login helper to dovecot_files",
    )
    cli_doctor.register(commands)
    cli_certs.register(commands)
    cli_relay.register(commands)
    setup.register(commands)
    return parser


Run = Callable[[argparse.Namespace], int | None]


def add_command(commands: Any, name: str, help: str, run: Run) -> argparse.ArgumentParser:
    """A subcommand taking --config; `run(args)` returns the exit code."""
    sub = commands.add_parser(name, help=help, description=help)
    sub.add_argument(
        "--config",
        type=Path,
        default=configuration.DEFAULT_PATH,
        help=f"configuration file (default {configuration.DEFAULT_PATH})",
    )
    sub.set_defaults(run=run)
    return sub


def load_config(args: argparse.Namespace) -> configuration.Config:
    return configuration.load(args.config)


def run_daemon(
    args: argparse.Namespace, main: Callable[[configuration.Config], Awaitable[None]]
) -> int:
    """Run a long-lived command (`serve`, `relay`) with logging set up as configured."""
    import trio

    from . import certificates, logsetup

    config = load_config(args)
    logsetup.configure(config.log_level, config.log_format)
    # What the service creates (database, its journal, sockets' neighbours) is its
    # own, whatever umask systemd, supervisord or a container gave it.
    os.umask(0o077)
    try:
        trio.run(main, config)
    except certificates.CertificateError as e:
        raise UsageError(str(e)) from None
    return 0


def _serve(args: argparse.Namespace) -> int:
    from . import service

    return run_daemon(args, service.serve)


def _devices(args: argparse.Namespace) -> int:
    config = load_config(args)
    # Registrations are stored under the user key: accept any spelling of the name.
    keys = UserKeys(config.username_format, config.default_domain)
    user = keys.key(args.user) if args.user else None
    store = open_store(config.database)
    try:
        devices = store.devices(user)
    finally:
        store.close()
    if args.json:
        print(json.dumps([d.as_json() for d in devices], indent=2))
        return 0
    if not devices:
        print("No devices registered" + (f" for {args.user}." if args.user else "."))
        return 0
    # USER is the key events are matched by: the name after username_format.
    rows = [("USER", "ACCOUNT", "DEVICE", "MAILBOXES", "REGISTERED", "LAST PUSH")]
    for d in devices:
        last = f"{iso(d.last_push_at)} {d.last_push_result}" if d.last_push_at else "never"
        # Names come from IMAP clients: their control characters are shown escaped.
        cells = (d.username, d.account_id, d.device_token[:12] + "…", ", ".join(d.mailboxes))
        rows.append((*map(escape_controls, cells), iso(d.registered_at), escape_controls(last)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def _dovecot(args: argparse.Namespace) -> int:
    config = load_config(args)
    version = args.dovecot_version or dovecot_config.installed_dovecot_version()
    if args.install:
        install_dovecot_files(config.dovecot_files)
        print(
            f"dovenotify: installed {', '.join(DOVECOT_FILES)} in {config.dovecot_files}",
            file=sys.stderr,
        )
    print(dovecot_snippet(config, version), end="")
    return 0


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
    source = Path(__file__).parent / "dovecot"
    if directory.exists() and not directory.is_dir():
        raise UsageError(f"dovecot_files {directory} is a file; it must name a directory")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    changed = []
    for name in DOVECOT_FILES:
        target = directory / name
        if not target.is_file() or target.read_bytes() != (source / name).read_bytes():
            shutil.copyfile(source / name, target)
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


if __name__ == "__main__":
    sys.exit(main())
