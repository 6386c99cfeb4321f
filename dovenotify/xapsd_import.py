"""Read what xapsd (the Go daemon dovenotify replaces) kept: registrations and credentials.

`database.json` holds the registrations and, when written between 2020-10 and
2025-10, the certificates xapsd obtained from Apple (`AppleCerts`; the mail pair
is index 2). Newer setups name certificate files in `xapsd.yaml`, relative to
/etc/xapsd/. Nothing here writes: `dovenotify import-xapsd` decides what to keep.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .certificates import CertificateError, Credentials, load_credentials
from .mailboxes import upgrade

XAPSD_DIR = Path("/etc/xapsd")
MAIL_CERTIFICATE_INDEX = 2  # calendar, contact, mail, mgmt, alerts
_HEX = re.compile(r"[0-9A-Fa-f]+")
# Go writes nanoseconds; Python reads at most microseconds.
_FRACTION = re.compile(r"(\.\d{6})\d+")


class XapsdError(Exception):
    """xapsd's files cannot be read; the message names the file and the problem."""


@attrs.frozen
class Entry:
    username: str
    account_id: str
    device_token: str
    mailboxes: tuple[str, ...]
    # None when xapsd kept no time (missing, or Go's zero time).
    registered_at: float | None


@attrs.frozen
class Database:
    entries: tuple[Entry, ...]
    # Why each entry that could not be imported was left out.
    skipped: tuple[str, ...]
    # The mail certificate and key from AppleCerts, if the file has them.
    apple_certificate: tuple[x509.Certificate, Any] | None


@attrs.frozen
class TokenSettings:
    key_file: Path
    key_id: str
    team_id: str
    topic: str


def read_database(path: Path) -> Database:
    try:
        document = json.loads(path.read_bytes())
    except OSError as error:
        raise XapsdError(f"{path}: cannot read: {error.strerror or error}") from error
    except ValueError as error:
        raise XapsdError(f"{path}: not xapsd's database.json (not JSON: {error})") from error
    except RecursionError as error:
        # xapsd nests three levels; Python's parser gives up near a thousand.
        raise XapsdError(
            f"{path}: not xapsd's database.json (its JSON is nested too deeply to read)"
        ) from error
    if not isinstance(document, dict) or not isinstance(document.get("Users", {}), dict):
        raise XapsdError(f'{path}: not xapsd\'s database.json (no "Users" mapping)')
    entries: list[Entry] = []
    skipped: list[str] = []
    for user, record in (document.get("Users") or {}).items():
        accounts = record.get("Accounts") if isinstance(record, dict) else None
        if not isinstance(accounts, dict):
            skipped.append(f"user {user!r}: no accounts")
            continue
        for account_id, account in accounts.items():
            entry = _entry(str(user).lower(), str(account_id), account)
            if isinstance(entry, str):
                skipped.append(f"user {user!r} account {account_id!r}: {entry}")
            else:
                entries.append(entry)
    return Database(tuple(entries), tuple(skipped), _apple_certificate(path, document))


def _entry(user: str, account_id: str, account: object) -> Entry | str:
    if not isinstance(account, dict):
        return "not an account record"
    token = account.get("DeviceToken")
    if not isinstance(token, str) or not _HEX.fullmatch(token):
        return f"device token {token!r} is not hex"
    if not account_id or not user:
        return "empty user or account id"
    mailboxes = account.get("Mailboxes")
    if not isinstance(mailboxes, list) or not all(isinstance(m, str) for m in mailboxes):
        mailboxes = []
    # xapsd only ever pushed INBOX, whatever the device asked for. The C plugin
    # passed the names on as iOS spelled them: stored in UTF-8, as the relay does.
    names = tuple(upgrade(mailboxes)) or ("INBOX",)
    return Entry(user, account_id, token.lower(), names, _time(account))


def _time(account: Mapping[str, Any]) -> float | None:
    value = account.get("RegistrationTime")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    # Go's zero time (0001-01-01) means "never set".
    return None if moment.year < 2000 else moment.timestamp()


def _apple_certificate(path: Path, document: Mapping[str, Any]) -> tuple[Any, Any] | None:
    certs = document.get("AppleCerts")
    if not isinstance(certs, dict):
        return None
    try:
        signature = certs["Signature"][MAIL_CERTIFICATE_INDEX]
        der = base64.b64decode(signature["Certificate"][0], validate=True)
        key_der = base64.b64decode(certs["Keys"][MAIL_CERTIFICATE_INDEX], validate=True)
        return (
            x509.load_der_x509_certificate(der),
            serialization.load_der_private_key(key_der, password=None),
        )
    except (KeyError, IndexError, TypeError, ValueError, binascii.Error) as error:
        raise XapsdError(
            f"{path}: AppleCerts is there but its mail certificate (index 2) cannot be read"
            f" ({type(error).__name__}: {error})"
        ) from error


# The keys of xapsd.yaml dovenotify reads; each holds one file name or value.
_STRING_KEYS = (
    "certificateFileP12",
    "certificateFilePem",
    "certificateFilePemKey",
    "keyFileP8",
    "keyFileTopic",
    "keyFileKeyId",
    "keyFileTeamId",
)


def _kind(value: object) -> str:
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a yes/no value" if isinstance(value, bool) else "a number"


def read_config(path: Path, base: Path = XAPSD_DIR) -> Credentials | TokenSettings | None:
    """The credentials xapsd.yaml names (file names relative to `base`), if any."""
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise XapsdError(f"{path}: cannot read: {error.strerror or error}") from error
    except yaml.YAMLError as error:
        raise XapsdError(f"{path}: not valid YAML: {error}") from error
    except RecursionError as error:
        raise XapsdError(f"{path}: this YAML is nested too deeply to read") from error
    if not isinstance(settings, dict):
        raise XapsdError(f"{path}: expected xapsd's settings (a mapping)")
    for key in _STRING_KEYS:
        value = settings.get(key)
        # YAML reads a numeric team id (1234567890) as a number: that is still a name.
        if value is not None and (isinstance(value, bool) or not isinstance(value, str | int)):
            raise XapsdError(
                f"{path}: {key} must be a single name or value, not"
                f" {_kind(value)} ({json.dumps(value, default=str)[:60]})"
            )

    def file(key: str) -> Path | None:
        name = settings.get(key)
        return base / str(name) if name else None

    try:
        if p12 := file("certificateFileP12"):
            return load_credentials(p12)
        if pem := file("certificateFilePem"):
            return load_credentials(pem, file("certificateFilePemKey"))
    except CertificateError as error:
        raise XapsdError(f"{path} names a certificate dovenotify cannot use: {error}") from error
    if p8 := file("keyFileP8"):
        missing = [
            k for k in ("keyFileTopic", "keyFileKeyId", "keyFileTeamId") if not settings.get(k)
        ]
        if missing:
            raise XapsdError(f"{path}: keyFileP8 is set but not {', '.join(missing)}")
        return TokenSettings(
            p8,
            str(settings["keyFileKeyId"]),
            str(settings["keyFileTeamId"]),
            str(settings["keyFileTopic"]),
        )
    return None
