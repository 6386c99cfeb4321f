"""`dovenotify relay`: run only the registration relay (relay_process: separate)."""

from __future__ import annotations

import argparse
from typing import Any

from dovenotify.cli.registry import add_command, run_daemon


def register(commands: Any) -> None:

    add_command(
        commands,
        "relay",
        "Run only the registration relay, as a process of its own (relay_process: separate).",
        _relay,
    )


def _relay(args: argparse.Namespace) -> int:
    from dovenotify import relay_process

    return run_daemon(args, relay_process.run)
