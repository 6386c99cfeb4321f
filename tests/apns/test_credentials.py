"""APNs credentials as the configuration names them: certificates, topics, tokens, expiry."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dovenotify.apns.auth import expiry_warning, load_auth, open_sender
from dovenotify.apns.certificates import CertificateError, load_credentials
from dovenotify.apns.protocol import Action, Push
from dovenotify.apns.token import (
    MIN_TOKEN_AGE,
    REFRESH_AFTER,
    TokenSigner,
    load_token_key,
    verify_token,
)
from dovenotify.core import config
from tests.harness.apns_standin import ApnsStandin, run_apns_standin
from tests.harness.certs import P12_PASSWORD, Pki
from tests.harness.service import dovenotify_command, run_service

TOKEN = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0"  # made up
ACCOUNT = "0715A26B-CA09-4730-A419-793000CA982E"


def apns_config(**values: object) -> config.ApnsConfig:
    return config.ApnsConfig(**values)  # type: ignore[arg-type]


# --- topics and environments ---------------------------------------------------------


def test_topic_defaults_to_the_subject_uid(test_pki: Pki) -> None:
    auth = load_auth(apns_config(certificate=test_pki.client_with_topics.combined_pem))
    assert auth.topic == "com.apple.mobilemail.push.test.example"
    assert auth.topics == {
        "com.apple.mobilemail.push.test.example",
        "com.apple.mobilemail.push.test.example.voip",
        "com.apple.mobilemail.push.test.example.complication",
    }


def test_topic_can_name_one_from_the_topics_extension(test_pki: Pki) -> None:
    voip = "com.apple.mobilemail.push.test.example.voip"
    auth = load_auth(apns_config(certificate=test_pki.client_with_topics.combined_pem, topic=voip))
    assert auth.topic == voip


def test_topic_the_certificate_does_not_serve_is_an_error(test_pki: Pki) -> None:
    with pytest.raises(
        CertificateError, match=re.escape("apns.topic 'com.example.other': the certificate")
    ):
        load_auth(apns_config(certificate=test_pki.client.combined_pem, topic="com.example.other"))


def test_sandbox_switches_the_default_endpoint_only(tmp_path: Path) -> None:
    path = tmp_path / "dovenotify.yaml"
    sandbox = config.parse("apns:\n  sandbox: true\n", path)
    assert sandbox.apns.endpoint == "https://api.sandbox.push.apple.com"
    explicit = config.parse("apns:\n  sandbox: true\n  endpoint: https://127.0.0.1:1\n", path)
    assert explicit.apns.endpoint == "https://127.0.0.1:1"
    assert config.parse("", path).apns.endpoint == "https://api.push.apple.com"
    with pytest.raises(config.ConfigError, match=re.escape("apns.sandbox: expected true or false")):
        config.parse("apns:\n  sandbox: maybe\n", path)


def test_retry_deadline_defaults_to_an_hour(tmp_path: Path) -> None:
    assert config.parse("", tmp_path / "d.yaml").retry_deadline == 3600
    assert config.parse("retry_deadline: 60\n", tmp_path / "d.yaml").retry_deadline == 60


# --- token authentication ------------------------------------------------------------


def test_token_auth_needs_key_id_team_id_and_topic(test_pki: Pki) -> None:
    with pytest.raises(CertificateError, match=re.escape("apns.key_id, apns.team_id, apns.topic")):
        load_auth(apns_config(token_key=test_pki.token_key))


def test_token_is_reused_for_50_minutes_and_never_renewed_sooner_than_20(test_pki: Pki) -> None:
    now = [1_700_000_000.0]
    signer = TokenSigner(load_token_key(test_pki.token_key), "KEY", "TEAM", lambda: now[0])
    first = signer.token()
    header, claims = verify_token(first, test_pki.token_public_key)
    assert header == {"alg": "ES256", "kid": "KEY"}
    assert claims == {"iss": "TEAM", "iat": 1_700_000_000}
    now[0] += REFRESH_AFTER - 1
    assert signer.token() == first
    now[0] += 1
    second = signer.token()
    assert second != first
    # APNs calling a fresh token expired does not make us renew it (429 would follow).
    now[0] += MIN_TOKEN_AGE - 1
    assert not signer.expired()
    assert signer.token() == second
    now[0] += 1
    assert signer.expired()
    assert signer.token() != second


def test_a_tampered_token_does_not_verify(test_pki: Pki) -> None:
    token = TokenSigner(load_token_key(test_pki.token_key), "KEY", "TEAM").token()
    header, claims, signature = token.split(".")
    forged = f"{header}.{claims[:-2]}xx.{signature}"
    with pytest.raises(ValueError):
        verify_token(forged, test_pki.token_public_key)


def test_a_certificate_is_not_a_p8_key(test_pki: Pki) -> None:
    with pytest.raises(CertificateError, match=re.escape("not an APNs .p8 key")):
        load_token_key(test_pki.client.cert_pem)


# --- PKCS#12 through the sender ------------------------------------------------------


@pytest.mark.parametrize("with_password", [False, True])
async def test_p12_with_and_without_password_reaches_apns(
    test_pki: Pki, apns_standin: ApnsStandin, tmp_path: Path, with_password: bool
) -> None:
    if with_password:
        password_file = tmp_path / "p12.password"
        password_file.write_bytes(P12_PASSWORD + b"\n")
        settings = apns_config(
            certificate=test_pki.client.p12_with_password, password_file=password_file
        )
    else:
        settings = apns_config(certificate=test_pki.client.p12)
    settings = attrs.evolve(settings, endpoint=apns_standin.url, ca_file=test_pki.ca_file)
    auth = load_auth(settings)
    async with open_sender(settings, auth) as sender:
        outcome = await sender.send(Push(TOKEN, auth.topic, ACCOUNT))
    assert outcome.action is Action.DELIVERED
    presented = apns_standin.peer_certificates[-1]
    assert presented == load_credentials(test_pki.client.combined_pem).certificate


def test_wrong_p12_password_is_named(test_pki: Pki, tmp_path: Path) -> None:
    password_file = tmp_path / "p12.password"
    password_file.write_bytes(b"not it")
    with pytest.raises(CertificateError, match="wrong password for the PKCS#12 file"):
        load_auth(
            apns_config(certificate=test_pki.client.p12_with_password, password_file=password_file)
        )


# --- expiry --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("days", "warning"), [(400, None), (30.5, None), (30, 30), (8, 30), (7, 7), (1.5, 7), (1, 1)]
)
def test_expiry_warning_thresholds(days: float, warning: int | None) -> None:
    assert expiry_warning(days) == warning


async def test_certificate_expiring_soon_is_a_warning_in_the_log(
    test_pki: Pki, tmp_path: Path
) -> None:
    settings = {
        "database": str(tmp_path / "registrations.sqlite"),
        "event_socket": str(tmp_path / "events.sock"),
        "relay_socket": str(tmp_path / "relay.sock"),
        "apns": {"certificate": str(test_pki.client_expiring.combined_pem)},
    }
    async with run_service(tmp_path / "service", settings) as service:
        pass
    expires = f"{test_pki.client_expiring.not_after:%Y-%m-%d}"
    (line,) = [line for line in service.log_text().splitlines() if "expires on" in line]
    assert "WARNING" in line
    assert f"expires on {expires}" in line
    assert "in 5 days" in line


async def test_expired_certificate_at_start_up_is_a_clear_error(
    test_pki: Pki, tmp_path: Path
) -> None:
    path = tmp_path / "dovenotify.yaml"
    path.write_text(
        f"database: {tmp_path / 'r.sqlite'}\n"
        f"event_socket: {tmp_path / 'e.sock'}\n"
        f"relay_socket: {tmp_path / 'r.sock'}\n"
        f"apns:\n  certificate: {test_pki.client_expired.combined_pem}\n"
    )
    with trio.fail_after(15):
        result = await trio.run_process(
            [*dovenotify_command(), "serve", "--config", str(path)],
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2
    expired = f"{test_pki.client_expired.not_after:%Y-%m-%d}"
    assert stderr.startswith(f"dovenotify: {test_pki.client_expired.combined_pem}: ")
    assert f"the certificate expired on {expired} (35 days ago)" in stderr
    assert "Traceback" not in stderr


def test_days_left(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client_expiring.combined_pem)
    assert 4.9 < credentials.days_left(datetime.now(UTC)) <= 5


async def test_standin_refuses_a_token_signed_with_another_key(
    test_pki: Pki, tmp_path: Path
) -> None:
    other = tmp_path / "AuthKey_OTHER.p8"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    async with run_apns_standin(test_pki, token_key=test_pki.token_public_key) as standin:
        settings = apns_config(
            token_key=other,
            key_id="OTHER",
            team_id="TEAM",
            topic="com.example.mail",
            endpoint=standin.url,
            ca_file=test_pki.ca_file,
        )
        async with open_sender(settings, load_auth(settings)) as sender:
            outcome = await sender.send(Push(TOKEN, "com.example.mail", ACCOUNT))
    assert (outcome.action, outcome.status, outcome.reason) == (
        Action.CONFIG_ERROR,
        403,
        "InvalidProviderToken",
    )
    assert standin.tokens == []
