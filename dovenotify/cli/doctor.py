"""`dovenotify doctor`: run the installation checks and print one verdict per line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dovenotify.admin import doctor
from dovenotify.cli.registry import add_command


def register(commands: Any) -> None:

    sub = add_command(
        commands,
        "doctor",
        "Check the installation (config, certificate, Dovecot, sockets, relay, APNs).",
        _doctor,
    )
    sub.add_argument(
        "--dovecot-conf",
        type=Path,
        help="Dovecot's configuration file, when it is not the default one",
    )
    sub.add_argument(
        "--mail-user",
        help="the user mail is accessed as, when Dovecot's mail_uid is not set globally",
    )


def _doctor(args: argparse.Namespace) -> int:
    return check(args.config, args.dovecot_conf, args.mail_user)


def check(config: Path, dovecot_conf: Path | None = None, mail_user: str | None = None) -> int:
    """Print one verdict per check; 1 if any failed (`setup` ends with this too)."""
    command = ["doveconf", *(["-c", str(dovecot_conf)] if dovecot_conf else [])]
    verdicts = doctor.run(doctor.Findings(config, command, mail_user=mail_user))
    width = max(len(v.check) for v in verdicts)
    for v in verdicts:
        print(f"{'ok' if v.ok else 'FAIL':4}  {v.check:{width}}  {v.summary}")
        if v.fix:
            print(f"{'':4}  {'':{width}}  fix: {v.fix}")
    failed = [v.check for v in verdicts if not v.ok]
    print(
        f"\n{len(failed)} check(s) failed: {', '.join(failed)}"
        if failed
        else "\nAll checks passed."
    )
    return 1 if failed else 0
