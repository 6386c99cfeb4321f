"""`dovenotify relay`: run only the registration relay (relay_process: separate)."""

from __future__ import annotations

import argparse
from typing import Any


def register(commands: Any) -> None:
    from .cli import add_command  # cli imports this module first

    add_command(
        commands,
        "relay",
        "Run only the registration relay, as a process of its own (relay_process: separate).",
        _relay,
    )


def _relay(args: argparse.Namespace) -> int:
    import trio

    from . import certificates, logsetup, relay_process
    from .cli import UsageError, load_config

    config = load_config(args)
    logsetup.configure(config.log_level, config.log_format)
    try:
        trio.run(relay_process.run, config)
    except certificates.CertificateError as e:
        raise UsageError(str(e)) from None
    return 0
