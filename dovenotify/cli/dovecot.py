"""`dovenotify dovecot-config`: print Dovecot's snippet, and install the files it runs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dovenotify.cli.registry import add_command, load_config
from dovenotify.dovecot import config as dovecot_config
from dovenotify.dovecot.files import DOVECOT_FILES, dovecot_snippet, install_dovecot_files


def register(commands: Any) -> None:
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
