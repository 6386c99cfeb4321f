"""`dovenotify relay`: run only the registration relay (relay_process: separate)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    from dovenotify.cli.main import add_command  # cli imports this module first

    add_command(
        commands,
        "relay",
        "Run only the registration relay, as a process of its own (relay_process: separate).",
        _relay,
    )


def _relay(args: argparse.Namespace) -> int:
    from dovenotify import relay_process
    from dovenotify.cli.main import run_daemon

    return run_daemon(args, relay_process.run)
