"""From the `apns` configuration to what the sender authenticates with, and which topics.

Two ways to authenticate: a client certificate (its subject UID is the topic, and
a universal certificate serves the topics in its topics extension too), or a
token signed with a .p8 key (the topic is then whatever `apns.topic` says).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import attrs

from dovenotify.apns.certificates import CertificateError, Credentials, load_credentials
from dovenotify.apns.sender import ApnsSender
from dovenotify.apns.token import TokenSigner, load_token_key
from dovenotify.core.config import ApnsConfig, ConfigError
from dovenotify.core.config import load as load_config

log = logging.getLogger("dovenotify")

# Days before expiry at which the log warns, once each.
EXPIRY_WARNINGS = (30, 7, 1)


@attrs.frozen
class Auth:
    credentials: Credentials | None
    token: TokenSigner | None
    # What new registrations are told and pushes to them use.
    topic: str
    # Every topic these credentials can push to (registrations keep the topic they got).
    topics: frozenset[str]

    def describe(self) -> str:
        if self.credentials is None:
            return f"token key {self.token.key_id if self.token else '?'}, topic {self.topic}"
        return f"certificate {self.credentials.source}, topic {self.topic}"


def load_auth(apns: ApnsConfig, clock: Callable[[], float] = time.time) -> Auth:
    """Load and check the credentials the configuration names; CertificateError if unusable."""
    if apns.token_key is not None:
        return _token_auth(apns, clock)
    if apns.certificate is None:
        raise CertificateError(
            "apns.certificate is not set: name your APNs certificate file"
            " (or use token authentication: apns.token_key, key_id, team_id, topic)"
        )
    credentials = load_credentials(apns.certificate, apns.key, read_password(apns.password_file))
    now = datetime.fromtimestamp(clock(), UTC)
    if credentials.is_expired(now):
        raise CertificateError(
            f"{credentials.source}: the certificate expired on"
            f" {credentials.not_after:%Y-%m-%d} ({-credentials.days_left(now):.0f} days ago);"
            " APNs will refuse it. Import a valid one with `dovenotify cert import`."
        )
    topics = frozenset({credentials.topic, *credentials.topics})
    topic = apns.topic or credentials.topic
    if topic not in topics:
        raise CertificateError(
            f"apns.topic '{topic}': the certificate in {credentials.source} serves only "
            + ", ".join(sorted(topics))
        )
    return Auth(credentials, None, topic, topics)


def _token_auth(apns: ApnsConfig, clock: Callable[[], float]) -> Auth:
    missing = [name for name in ("key_id", "team_id", "topic") if not getattr(apns, name)]
    if missing:
        raise CertificateError(
            "token authentication (apns.token_key) also needs "
            + ", ".join(f"apns.{name}" for name in missing)
        )
    assert apns.token_key and apns.key_id and apns.team_id and apns.topic
    signer = TokenSigner(load_token_key(apns.token_key), apns.key_id, apns.team_id, clock)
    return Auth(None, signer, apns.topic, frozenset({apns.topic}))


def reload_auth(config_path: Path, current: Auth) -> tuple[ApnsConfig, Auth] | None:
    """The `apns` settings and their credentials read again (SIGHUP).

    None when they are unusable: that is logged, and the caller keeps `current`,
    so a typo in a reload never stops pushes or registrations.
    """
    try:
        apns = load_config(config_path).apns
        return apns, load_auth(apns)
    except (ConfigError, CertificateError) as error:
        log.error("reload failed, still using %s: %s", current.describe(), error)
        return None


def open_sender(apns: ApnsConfig, auth: Auth) -> ApnsSender:
    """A sender for these settings; its connection runs in `async with sender:`."""
    sender = ApnsSender(None)
    configure_sender(sender, apns, auth)
    return sender


def configure_sender(sender: ApnsSender, apns: ApnsConfig, auth: Auth) -> None:
    """Point `sender` at what `apns` and `auth` say (at start, and on reload)."""
    sender.configure(
        auth.credentials,
        token=auth.token,
        endpoint=apns.endpoint,
        ca_file=apns.ca_file,
        timeout=apns.timeout,
    )


def read_password(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes().rstrip(b"\r\n")
    except OSError as error:
        raise CertificateError(
            f"{path}: cannot read the password file: {error.strerror or error}"
        ) from error


def expiry_warning(days_left: float) -> int | None:
    """The warning threshold (30, 7, 1 days) `days_left` has reached, if any."""
    return min((days for days in EXPIRY_WARNINGS if days_left <= days), default=None)
