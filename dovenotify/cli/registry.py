"""What every command module needs from the CLI, so that none imports cli.commands back.

cli/commands.py builds the parser and calls each command module's `register`; the
command modules import only this.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dovenotify.core import config as configuration


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback."""


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

    from dovenotify.apns import certificates
    from dovenotify.core import logsetup

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
