"""Commands for APNs credentials and moving over from xapsd.

`dovenotify cert show`, `dovenotify cert request --topic T`, `dovenotify cert import FILE`,
`dovenotify test-push --user NAME` and `dovenotify import-xapsd --database database.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from . import service_files, xapsd_import
from .apns_auth import load_auth, open_sender, read_password
from .certificates import (
    CertificateError,
    Credentials,
    certificate_request,
    credentials_from,
    environment,
    load_credentials,
    private_pem,
    save_credentials,
    topic_problem,
)
from .config import ApnsConfig, Config
from .store import Registration, iso, open_store
from .usernames import UserKeys


def register(commands: Any) -> None:
    # Here, not at the top: cli imports this module to call register().
    from .cli import add_command

    help = "Show or replace the APNs certificate."
    cert = commands.add_parser("cert", help=help, description=help)
    actions = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION")
    show = add_command(
        actions,
        "show",
        "Print the configured APNs certificate (or FILE): subject, topics, expiry."
        " Exit code 1 if it is expired or unusable.",
        _show,
    )
    show.add_argument("file", nargs="?", type=Path, help="a certificate file instead")
    show.add_argument("--key", type=Path, help="the key of FILE, when FILE has none (.cer)")
    show.add_argument("--password-file", type=Path, help="password for FILE, if a .p12")
    request = add_command(
        actions,
        "request",
        "Make a private key and a certificate signing request (CSR) for a"
        " com.apple.mobilemail.push.<reversed domain> topic, to upload to Apple.",
        _request,
    )
    request.add_argument(
        "--topic", required=True, help="com.apple.mobilemail.push.<your domain reversed>"
    )
    request.add_argument(
        "--key", type=Path, help="where the key goes (default: TOPIC.key beside --config)"
    )
    request.add_argument(
        "--csr", type=Path, help="where the CSR goes (default: TOPIC.csr beside the key)"
    )
    imported = add_command(
        actions,
        "import",
        "Check a certificate and key (PEM, .p12/.pfx, or Apple's .cer with --key) and"
        " install them where apns.certificate (and apns.key) say, readable by the service.",
        _import,
    )
    imported.add_argument(
        "file", type=Path, help="PEM with certificate and key, .p12/.pfx, or Apple's .cer"
    )
    imported.add_argument("--key", type=Path, help="the key, when it is in a file of its own")
    imported.add_argument("--password-file", type=Path, help="password of the .p12 or key")

    push = add_command(
        commands,
        "test-push",
        "Push each device of a user now and print APNs's answer for each.",
        _test_push,
    )
    push.add_argument("--user", required=True, help="whose devices")

    xapsd = add_command(
        commands,
        "import-xapsd",
        "Import registrations and the certificate from xapsd (safe to run again).",
        _import_xapsd,
    )
    xapsd.add_argument("--database", type=Path, required=True, help="xapsd's database.json")
    xapsd.add_argument("--xapsd-config", type=Path, help="xapsd.yaml naming its certificate")
    xapsd.add_argument(
        "--export-certificate",
        type=Path,
        metavar="FILE",
        help="also write xapsd's certificate and key (PEM) to FILE, even when"
        " apns.certificate already holds one",
    )
    xapsd.add_argument(
        "--xapsd-dir",
        type=Path,
        default=xapsd_import.XAPSD_DIR,
        help=f"where xapsd.yaml's file names are relative to (default {xapsd_import.XAPSD_DIR})",
    )


# --- cert show -------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    from .cli import load_config

    config = load_config(args) if args.file is None else None
    try:
        if args.file is not None:
            credentials = load_credentials(args.file, args.key, read_password(args.password_file))
        else:
            assert config is not None
            apns = config.apns
            if apns.token_key is not None:
                auth = load_auth(apns)
                print(f"Token authentication: key {apns.token_key}, key id {apns.key_id},")
                print(f"  team {apns.team_id}, topic {auth.topic}")
                return 0
            if apns.certificate is None:
                raise CertificateError("apns.certificate is not set")
            credentials = load_credentials(
                apns.certificate, apns.key, read_password(apns.password_file)
            )
    except CertificateError as error:
        print(f"dovenotify: this certificate cannot be used: {error}", file=sys.stderr)
        return 1
    _print_certificate(credentials)
    problem = _problem(credentials, config.apns if config else None)
    if problem:
        print(f"dovenotify: this certificate cannot be used: {problem}", file=sys.stderr)
        return 1
    return 0


def _print_certificate(credentials: Credentials) -> None:
    cert = credentials.certificate
    rows = [
        ("File", str(credentials.source)),
        ("Subject", cert.subject.rfc4514_string()),
        ("Topic", credentials.topic),
    ]
    if credentials.topics:
        rows.append(("Topics", ", ".join(credentials.topics)))
    rows += [
        ("Issuer", cert.issuer.rfc4514_string()),
        ("Environment", environment(credentials)),
        ("Not before", f"{credentials.not_before:%Y-%m-%d %H:%M} UTC"),
        ("Not after", f"{credentials.not_after:%Y-%m-%d %H:%M} UTC"),
        ("Days left", f"{credentials.days_left():.0f}"),
    ]
    for name, value in rows:
        print(f"{name + ':':<13}{value}")


def _problem(credentials: Credentials, apns: ApnsConfig | None) -> str | None:
    now = datetime.now(UTC)
    if credentials.not_before > now:
        return f"it is not valid before {credentials.not_before:%Y-%m-%d %H:%M} UTC"
    if credentials.is_expired(now):
        return (
            f"it expired on {credentials.not_after:%Y-%m-%d}"
            f" ({-credentials.days_left(now):.0f} days ago)"
        )
    topics = {credentials.topic, *credentials.topics}
    if apns is not None and apns.topic and apns.topic not in topics:
        return f"apns.topic '{apns.topic}' is not one of its topics"
    return None


# --- cert request ----------------------------------------------------------------------


def _request(args: argparse.Namespace) -> int:
    from .cli import UsageError

    problem = topic_problem(args.topic)
    if problem:
        raise UsageError(f"--topic {problem}")
    key_path: Path = (args.key or args.config.parent / f"{args.topic}.key").absolute()
    csr_path: Path = args.csr or key_path.with_suffix(".csr")
    for path in (key_path, csr_path):
        if path.exists():
            # The key of a request Apple may already be answering: never overwrite it.
            raise UsageError(
                f"{path} already exists: import Apple's certificate with that key, or"
                " move it away to start a new request"
            )
    key, csr = certificate_request(args.topic)
    try:
        ownership = service_files.write(key_path, private_pem(key))
        service_files.write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
        csr_path.chmod(0o644)
    except OSError as error:
        raise UsageError(f"cannot write the request: {error}") from None
    print(
        f"Wrote the private key to {key_path} ({ownership.describe()}): keep it; it never"
        f" goes to Apple.\nWrote the certificate signing request to {csr_path}.\n\n"
        "Next (not self-service: Apple must first have granted your developer team this"
        " topic):\n"
        "  1. developer.apple.com > Certificates, Identifiers & Profiles > Certificates >"
        " +,\n     Apple Push Notification service SSL, for"
        f" {args.topic}; upload {csr_path}.\n"
        "  2. Download the certificate Apple makes (aps.cer), then:\n"
        f"       dovenotify cert import aps.cer --key {key_path}\n"
        "  3. Reload the service: systemctl reload dovenotify (or kill -HUP its pid)."
    )
    return 0


# --- cert import -----------------------------------------------------------------------


def _import(args: argparse.Namespace) -> int:
    from .cli import UsageError, load_config

    config = load_config(args)
    try:
        credentials = load_credentials(args.file, args.key, read_password(args.password_file))
    except CertificateError as error:
        raise UsageError(str(error)) from None
    problem = _problem(credentials, None)
    if problem:
        raise UsageError(f"{args.file}: not imported: {problem}")
    print(_install(credentials, config))
    _print_certificate(load_credentials(config.apns.certificate, config.apns.key))  # type: ignore[arg-type]
    return 0


def _install(credentials: Credentials, config: Config) -> str:
    from .cli import UsageError

    apns = config.apns
    if apns.certificate is None:
        raise UsageError(f"{config.path}: set apns.certificate to where the certificate goes")
    try:
        written = save_credentials(credentials, apns.certificate, apns.key)
    except OSError as error:
        raise UsageError(f"cannot install the certificate: {error}") from None
    where = " and ".join(f"{path} ({ownership.describe()})" for path, ownership in written)
    note = ""
    if apns.password_file is not None:
        note = (
            f"\nThe key is stored without a password: remove apns.password_file from {config.path}."
        )
    return (
        f"Installed the certificate for {credentials.topic} in {where}."
        f" Reload the service (SIGHUP, `systemctl reload dovenotify`) to use it.{note}"
    )


# --- test-push -------------------------------------------------------------------------


def _test_push(args: argparse.Namespace) -> int:
    import trio

    from .cli import UsageError, load_config
    from .service import describe

    config = load_config(args)
    user = UserKeys(config.username_format, config.default_domain).key(args.user)
    store = open_store(config.database)
    try:
        devices = store.devices(user)
    finally:
        store.close()
    if not devices:
        print(f"{args.user} has no registered devices.")
        return 1
    try:
        auth = load_auth(config.apns)
    except CertificateError as error:
        raise UsageError(str(error)) from None

    async def push_all() -> list[str]:
        from .apns import Push

        answers = []
        async with open_sender(config.apns, auth) as sender:
            for device in devices:
                outcome = await sender.send(
                    Push(
                        device.device_token,
                        device.topic,
                        device.account_id,
                        push_type=config.apns.push_type,
                        expiration_seconds=config.apns.expiration,
                        priority=config.apns.priority,
                    )
                )
                answers.append(describe(outcome))
        return answers

    answers = trio.run(push_all)
    for device, answer in zip(devices, answers, strict=True):
        print(f"{device.account_id}  {device.device_token[:12]}…  {device.topic}: {answer}")
    return 0 if all(answer == "delivered" for answer in answers) else 1


# --- import-xapsd ----------------------------------------------------------------------


def _import_xapsd(args: argparse.Namespace) -> int:
    from .cli import UsageError, load_config

    config = load_config(args)
    try:
        database = xapsd_import.read_database(args.database)
        from_config = (
            xapsd_import.read_config(args.xapsd_config, args.xapsd_dir)
            if args.xapsd_config
            else None
        )
    except xapsd_import.XapsdError as error:
        raise UsageError(str(error)) from None

    credentials: Credentials | None = None
    if database.apple_certificate is not None:
        certificate, key = database.apple_certificate
        try:
            credentials = credentials_from(
                certificate, key, [], Path(f"{args.database} (AppleCerts)")
            )
        except CertificateError as error:
            raise UsageError(str(error)) from None
    if isinstance(from_config, Credentials):
        credentials = from_config
    topic = _install_for_import(credentials, from_config, config)

    if args.export_certificate is not None:
        print(_export(credentials, args.export_certificate))
    imported, skipped = _import_entries(database, topic, config)
    print(f"Imported {imported} registration(s) from {args.database}, topic {topic}.")
    if skipped:
        print(f"Skipped {len(skipped)}:")
        for reason in skipped:
            print(f"  {reason}")
    return 0


def _import_entries(
    database: xapsd_import.Database, topic: str, config: Config
) -> tuple[int, list[str]]:
    """Store xapsd's registrations that are still alive; the count, and why others were not."""
    keys = UserKeys(config.username_format, config.default_domain)
    now = time.time()
    imported, skipped = 0, list(database.skipped)
    # A database made here (as root) must be the service's, which writes it.
    created: tuple[Path, service_files.Ownership] | None = None
    if "://" not in config.database and not Path(config.database).exists():
        path = Path(config.database)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = path, service_files.ownership_for(path)
    store = open_store(config.database)
    try:
        for entry in database.entries:
            username = keys.key(entry.username)
            what = f"user {entry.username!r} account {entry.account_id!r}"
            registered_at = entry.registered_at or now
            if now - registered_at > config.registration_ttl:
                skipped.append(
                    f"{what}: last registered {iso(registered_at)[:10]}, longer ago than"
                    f" registration_ttl ({config.registration_ttl / 86400:g} days); the device"
                    " registers again when Mail next connects"
                )
                continue
            present = [d for d in store.devices(username) if d.account_id == entry.account_id]
            if any(d.device_token == entry.device_token for d in present):
                skipped.append(f"{what}: already registered")
                continue
            if present and (
                entry.registered_at is None
                or any(d.registered_at >= entry.registered_at for d in present)
            ):
                # The device registered with dovenotify since: xapsd's token is the old one.
                skipped.append(f"{what}: registered with dovenotify since, under a newer token")
                continue
            store.register(
                Registration(
                    username=username,
                    account_id=entry.account_id,
                    device_token=entry.device_token,
                    topic=topic,
                    mailboxes=entry.mailboxes,
                    registered_at=registered_at,
                )
            )
            imported += 1
    finally:
        store.close()
    if created is not None:
        path, ownership = created
        for made in (path, *(path.with_name(path.name + s) for s in ("-wal", "-shm"))):
            if made.exists():
                service_files.adopt(made, ownership)
    return imported, skipped


def _export(credentials: Credentials | None, target: Path) -> str:
    from .cli import UsageError

    if credentials is None:
        raise UsageError(
            f"--export-certificate {target}: xapsd's files hold no certificate to export"
        )
    try:
        ownership = service_files.write(target, credentials.pem())
    except OSError as error:
        raise UsageError(f"cannot write {target}: {error}") from None
    expired = " (expired)" if credentials.is_expired() else ""
    return (
        f"Wrote xapsd's certificate for {credentials.topic}{expired}, expiring"
        f" {credentials.not_after:%Y-%m-%d}, with its key to {target} ({ownership.describe()})."
    )


def _install_for_import(
    credentials: Credentials | None,
    from_config: Credentials | xapsd_import.TokenSettings | None,
    config: Config,
) -> str:
    """Put xapsd's certificate in place unless one is there; the topic to register with."""
    from .cli import UsageError

    apns = config.apns
    if isinstance(from_config, xapsd_import.TokenSettings):
        print(
            "xapsd uses token authentication; to do the same, set in"
            f" {config.path}:\n  apns:\n    token_key: {from_config.key_file}\n"
            f"    key_id: {from_config.key_id}\n    team_id: {from_config.team_id}\n"
            f"    topic: {from_config.topic}"
        )
        return from_config.topic
    if credentials is None:
        try:
            return load_auth(apns).topic
        except CertificateError as error:
            raise UsageError(
                f"no certificate in xapsd's files and none usable in the configuration"
                f" to take the topic from: {error}"
            ) from None
    if apns.certificate is not None and apns.certificate.exists():
        try:
            present = load_credentials(
                apns.certificate, apns.key, read_password(apns.password_file)
            )
        except CertificateError:
            present = None
        if present is not None and present.certificate == credentials.certificate:
            print(f"The certificate for {credentials.topic} is already in {apns.certificate}.")
        else:
            print(
                f"Left {apns.certificate} as it is: it holds another certificate."
                f" To use xapsd's ({credentials.topic}, expires"
                f" {credentials.not_after:%Y-%m-%d}), write it to a file with"
                " --export-certificate FILE, then run `dovenotify cert import FILE`."
            )
        return credentials.topic
    if credentials.is_expired():
        print(
            f"xapsd's certificate for {credentials.topic} expired on"
            f" {credentials.not_after:%Y-%m-%d}: not installed."
        )
        return credentials.topic
    print(_install(credentials, config))
    return credentials.topic
