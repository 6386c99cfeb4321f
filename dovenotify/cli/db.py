"""`dovenotify db migrate`: create or upgrade the registration database's schema.

`dovenotify serve` does the same at start; running it by hand first is for sites
that want the upgrade to happen (and be seen to work) before the service starts,
e.g. once for a PostgreSQL database shared by several nodes.
"""

from __future__ import annotations

import argparse
from typing import Any

from dovenotify.cli.registry import add_command, load_config
from dovenotify.store.backends import open_store
from dovenotify.store.base import SCHEMA_VERSION


def register(commands: Any) -> None:

    help = "Manage the registration database."
    db = commands.add_parser("db", help=help, description=help)
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    add_command(
        actions,
        "migrate",
        "Create the registration database's tables, or upgrade them to this version.",
        _migrate,
    )


def _migrate(args: argparse.Namespace) -> int:

    open_store(load_config(args).database).close()
    print(f"The registration database is ready (schema version {SCHEMA_VERSION}).")
    return 0
