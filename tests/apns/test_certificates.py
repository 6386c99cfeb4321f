import ssl
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from dovenotify.apns.certificates import CertificateError, client_ssl_context, load_credentials
from tests.harness.certs import P12_PASSWORD, Pki


def test_pem_certificate_and_key_in_one_file(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client.combined_pem)
    assert credentials.topic == test_pki.client.topic
    assert credentials.topic.startswith("com.apple.mail.XServer.")
    assert credentials.topics == ()
    assert credentials.chain == ()
    assert credentials.source == test_pki.client.combined_pem


def test_pem_certificate_and_key_in_two_files(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client.cert_pem, test_pki.client.key_pem)
    assert credentials.topic == test_pki.client.topic


def test_pem_key_first_and_chain_after_leaf(test_pki: Pki, tmp_path: Path) -> None:
    # Order inside a PEM bundle varies by tool; the leaf is the one the key fits.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(
        test_pki.client.key_pem.read_bytes()
        + test_pki.client_ca_file.read_bytes()
        + test_pki.client.cert_pem.read_bytes()
    )
    credentials = load_credentials(bundle)
    assert credentials.topic == test_pki.client.topic
    assert [c.subject for c in credentials.chain] == [
        x509.load_pem_x509_certificate(test_pki.client_ca_file.read_bytes()).subject
    ]


def test_p12_without_password(test_pki: Pki) -> None:
    assert load_credentials(test_pki.client.p12).topic == test_pki.client.topic


def test_p12_with_empty_password_loads_without_one(test_pki: Pki) -> None:
    if test_pki.client.p12_empty_password is None:
        pytest.skip("no openssl CLI to write an empty-password PKCS#12 file")
    for password in (None, b""):
        credentials = load_credentials(test_pki.client.p12_empty_password, password=password)
        assert credentials.topic == test_pki.client.topic


def test_p12_with_password(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client.p12_with_password, password=P12_PASSWORD)
    assert credentials.topic == test_pki.client.topic


def test_p12_wrong_password_names_file_and_problem(test_pki: Pki) -> None:
    path = test_pki.client.p12_with_password
    with pytest.raises(CertificateError) as error:
        load_credentials(path, password=b"not it")
    assert str(error.value) == f"{path}: wrong password for the PKCS#12 file"


def test_p12_missing_password(test_pki: Pki) -> None:
    with pytest.raises(CertificateError, match="needs a password"):
        load_credentials(test_pki.client.p12_with_password)


def test_key_that_does_not_match(test_pki: Pki) -> None:
    with pytest.raises(CertificateError) as error:
        load_credentials(test_pki.client.cert_pem, test_pki.stray_key)
    message = str(error.value)
    assert str(test_pki.stray_key) in message
    assert "does not belong to the certificate" in message


def test_certificate_without_uid_has_no_topic(test_pki: Pki) -> None:
    with pytest.raises(CertificateError, match="no UID") as error:
        load_credentials(test_pki.client_without_uid)
    assert str(test_pki.client_without_uid) in str(error.value)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.pem", None, "cannot read"),
        ("garbage.p12", b"\x00\x01 not a certificate", "neither a PEM file nor a PKCS#12 file"),
        ("key-only.pem", b"-----BEGIN PRIVATE KEY-----\n", "no certificate in this PEM file"),
    ],
)
def test_unusable_files(tmp_path: Path, name: str, content: bytes | None, problem: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CertificateError) as error:
        load_credentials(path)
    assert str(error.value).startswith(f"{path}: {problem}")


def test_certificate_without_key(test_pki: Pki) -> None:
    with pytest.raises(CertificateError, match="no private key"):
        load_credentials(test_pki.client.cert_pem)


def test_topics_extension(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client_with_topics.p12)
    topic = "com.apple.mobilemail.push.test.example"
    assert credentials.topic == topic
    assert credentials.topics == (topic, f"{topic}.voip", f"{topic}.complication")


def test_expired_certificate_loads_and_reports_negative_days(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client_expired.combined_pem)
    assert credentials.expired
    assert credentials.days_left() < -34
    at = credentials.not_after - timedelta(days=10)
    assert credentials.days_left(at) == pytest.approx(10)
    assert not credentials.is_expired(at)


def test_valid_certificate_days_left(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client.combined_pem)
    assert not credentials.expired
    assert 364 < credentials.days_left() <= 365
    assert credentials.days_left(credentials.not_before) == pytest.approx(366)


def test_client_ssl_context(test_pki: Pki) -> None:
    credentials = load_credentials(test_pki.client.combined_pem)
    context = client_ssl_context(credentials, test_pki.ca_file)
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    # The extra CA is trusted on top of the system store.
    ca_subjects = [dict(item[0] for item in ca["subject"]) for ca in context.get_ca_certs()]
    assert any("dovenotify test server CA" in s.get("organizationName", "") for s in ca_subjects)
