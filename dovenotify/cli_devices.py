"""`dovenotify devices remove`: delete registrations by user, account id or device token.

It asks nothing (scripts and admins with a ticket open use it) and prints each
registration it removed, so the terminal or log shows exactly what went away.
"""

from __future__ import annotations

import argparse

from .logsetup import escape_controls
from .relay import short_token
from .store import open_store
from .usernames import UserKeys


def register(devices: argparse.ArgumentParser) -> None:
    # Here, not at the top: cli imports this module to call register().
    from .cli import add_command

    actions = devices.add_subparsers(dest="devices_action", metavar="ACTION")
    remove = add_command(
        actions,
        "remove",
        "Remove the registrations that match every criterion given.",
        _remove,
    )
    remove.add_argument("--user", help="the user's registrations")
    remove.add_argument("--account-id", help="registrations of this aps-account-id")
    remove.add_argument("--token", help="registrations of this device token")


def _remove(args: argparse.Namespace) -> int:
    from .cli import UsageError, load_config

    if not (args.user or args.account_id or args.token):
        raise UsageError("say which registrations to remove: --user, --account-id or --token")
    config = load_config(args)
    # Registrations are stored under the user key: accept any spelling of the name.
    keys = UserKeys(config.username_format, config.default_domain)
    store = open_store(config.database)
    try:
        removed = store.remove(
            username=keys.key(args.user) if args.user else None,
            account_id=args.account_id,
            device_token=args.token,
        )
    finally:
        store.close()
    if not removed:
        print("No registration matches; nothing was removed.")
        return 1
    for r in removed:
        line = (
            f"Removed {r.username} account {r.account_id} device {short_token(r.device_token)}"
            f" ({', '.join(r.mailboxes)})"
        )
        print(escape_controls(line))
    return 0
