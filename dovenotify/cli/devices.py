"""`dovenotify devices`: list registrations; `devices remove` deletes them by user,
account id or device token.

`remove` asks nothing (scripts and admins with a ticket open use it) and prints each
registration it removed, so the terminal or log shows exactly what went away.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from dovenotify.cli.registry import UsageError, add_command, load_config
from dovenotify.core.logsetup import escape_controls
from dovenotify.core.usernames import UserKeys
from dovenotify.store.backends import open_store
from dovenotify.store.base import iso, short_token


def register(commands: Any) -> None:
    devices = add_command(commands, "devices", "List registered devices.", _devices)
    devices.add_argument("--user", help="only this user's devices")
    devices.add_argument("--json", action="store_true", help="print a JSON array")
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


def _remove(args: argparse.Namespace) -> int:
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
