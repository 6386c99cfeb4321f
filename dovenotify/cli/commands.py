"""The `dovenotify` command: argument parsing and output only; the work is elsewhere."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dovenotify.cli import certs as cli_certs
from dovenotify.cli import db as cli_db
from dovenotify.cli import devices as cli_devices
from dovenotify.cli import doctor as cli_doctor
from dovenotify.cli import dovecot as cli_dovecot
from dovenotify.cli import relay as cli_relay
from dovenotify.cli import setup
from dovenotify.cli.registry import UsageError, add_command, run_daemon
from dovenotify.core import config as configuration
from dovenotify.core.logsetup import escape_controls
from dovenotify.store.base import StoreError


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

    cli_devices.register(commands)
    cli_dovecot.register(commands)
    cli_doctor.register(commands)
    cli_certs.register(commands)
    cli_relay.register(commands)
    setup.register(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from dovenotify import service

    return run_daemon(args, service.serve)


if __name__ == "__main__":
    sys.exit(main())
