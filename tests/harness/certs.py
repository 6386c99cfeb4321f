"""Test PKI: a server CA (trustme) and Apple-shaped APNs client certificates.

Two CAs, as in production: the servers (APNs stand-in, Dovecot) present a
certificate from `ca_file` (Apple's real server root is USERTrust), and the APNs
client certificates come from a separate issuer, `client_ca_file` (Apple
Application Integration 2 CA in production), which is what the stand-in requires.

Everything is written to files, because both dovenotify (as a subprocess) and
Dovecot read credentials from paths.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TOPICS_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.6")
P12_PASSWORD = b"test-p12-password"


@attrs.frozen
class ClientCert:
    """One client certificate in every format dovenotify accepts."""

    topic: str
    combined_pem: Path  # certificate then key, one file
    cert_pem: Path
    key_pem: Path
    p12: Path  # no password
    p12_with_password: Path  # P12_PASSWORD
    p12_empty_password: Path | None  # as xapsd writes them; None without the openssl CLI
    not_after: datetime


@attrs.frozen
class Pki:
    directory: Path
    # Trust this to reach the servers (stand-in, Dovecot); they present server_cert.
    ca_file: Path
    server_cert: Path  # for 127.0.0.1, ::1 and localhost
    server_key: Path
    # Issuer of the client certificates; the APNs stand-in requires one from it.
    client_ca_file: Path
    client: ClientCert  # legacy mail certificate: UID=com.apple.mail.XServer.<uuid>
    client_renewed: ClientCert  # same subject and topic as `client`, new key
    client_with_topics: ClientCert  # universal shape, with the topics extension
    client_expired: ClientCert
    client_expiring: ClientCert  # 5 days left: inside the 7-day warning
    client_stranger: ClientCert  # well-formed, but from an issuer the stand-in does not trust
    client_without_uid: Path  # combined PEM whose subject has no UID
    stray_key: Path  # a PEM key that belongs to no certificate here
    # Token authentication: an Apple-style .p8 key (PKCS#8 PEM, EC P-256).
    token_key: Path
    token_public_key: ec.EllipticCurvePublicKey
    # Stands in for Apple: issues the client certificates, and answers requests.
    client_issuer: _Issuer

    def answer_request(self, csr_pem: bytes, topic: str) -> bytes:
        """The aps.cer (DER) Apple's developer portal returns for a CSR and a topic."""
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        now = datetime.now(UTC)
        certificate = self.client_issuer.sign(
            csr.public_key(),  # type: ignore[arg-type]
            _apple_subject(topic, f"Apple Push Services: {topic}"),
            now - timedelta(minutes=5),
            now + timedelta(days=395),
            extensions=(
                x509.UnrecognizedExtension(TOPICS_EXTENSION_OID, encode_topics_extension(topic)),
            ),
        )
        return certificate.public_bytes(serialization.Encoding.DER)


def make_test_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    server_ca = trustme.CA(organization_name="dovenotify test server CA")
    ca_file = directory / "ca.pem"
    server_ca.cert_pem.write_to_path(str(ca_file))
    server = server_ca.issue_cert("127.0.0.1", "::1", "localhost")
    server_cert = directory / "server.pem"
    server_key = directory / "server.key"
    server.cert_chain_pems[0].write_to_path(str(server_cert))
    for extra in server.cert_chain_pems[1:]:
        extra.write_to_path(str(server_cert), append=True)
    server.private_key_pem.write_to_path(str(server_key))

    issuer = _Issuer.create("Test Apple Application Integration 2 Certification Authority")
    client_ca_file = directory / "client-ca.pem"
    client_ca_file.write_bytes(issuer.certificate.public_bytes(serialization.Encoding.PEM))

    def legacy_subject() -> x509.Name:
        account = str(uuid.uuid4())
        return _apple_subject(f"com.apple.mail.XServer.{account}", f"APSP:{account}")

    subject = legacy_subject()
    client = _write_client(
        directory / "client", issuer.issue(subject, now - timedelta(days=1), now + timedelta(365))
    )
    client_renewed = _write_client(
        directory / "client-renewed",
        issuer.issue(subject, now - timedelta(hours=1), now + timedelta(400)),
    )

    universal_topic = "com.apple.mobilemail.push.test.example"
    universal = issuer.issue(
        _apple_subject(universal_topic, f"Apple Push Services: {universal_topic}"),
        now - timedelta(days=1),
        now + timedelta(days=365),
        extensions=(
            x509.UnrecognizedExtension(
                TOPICS_EXTENSION_OID, encode_topics_extension(universal_topic)
            ),
        ),
    )
    client_with_topics = _write_client(directory / "client-topics", universal)

    subject = legacy_subject()
    expired = issuer.issue(subject, now - timedelta(days=400), now - timedelta(days=35))
    client_expired = _write_client(directory / "client-expired", expired)

    subject = legacy_subject()
    expiring = issuer.issue(subject, now - timedelta(days=360), now + timedelta(days=5))
    client_expiring = _write_client(directory / "client-expiring", expiring)

    subject = legacy_subject()
    stranger_issuer = _Issuer.create("Stranger CA")
    client_stranger = _write_client(
        directory / "client-stranger",
        stranger_issuer.issue(subject, now - timedelta(days=1), now + timedelta(days=365)),
    )

    no_uid = issuer.issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no uid here")]),
        now - timedelta(days=1),
        now + timedelta(days=365),
    )
    client_without_uid = directory / "client-no-uid.pem"
    client_without_uid.write_bytes(_cert_pem(no_uid[0]) + _key_pem(no_uid[1]))

    stray_key = directory / "stray.key"
    stray_key.write_bytes(_key_pem(_new_key()))

    ec_key = ec.generate_private_key(ec.SECP256R1())
    token_key = directory / "AuthKey_TESTKEY123.p8"
    token_key.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    return Pki(
        directory=directory,
        ca_file=ca_file,
        server_cert=server_cert,
        server_key=server_key,
        client_ca_file=client_ca_file,
        client=client,
        client_renewed=client_renewed,
        client_with_topics=client_with_topics,
        client_expired=client_expired,
        client_expiring=client_expiring,
        client_stranger=client_stranger,
        client_without_uid=client_without_uid,
        stray_key=stray_key,
        token_key=token_key,
        token_public_key=ec_key.public_key(),
        client_issuer=issuer,
    )


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The test PKI, made once per session (RSA key generation is the slow part)."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


def encode_topics_extension(topic: str) -> bytes:
    """DER for Apple's topics extension, as Apple documents its content.

    SEQUENCE { "topic", SEQUENCE { "app" }, "topic.voip", SEQUENCE { "voip" },
               "topic.complication", SEQUENCE { "complication" } }
    """
    parts = b""
    for suffix, kind in (("", "app"), (".voip", "voip"), (".complication", "complication")):
        parts += _der(0x0C, (topic + suffix).encode()) + _der(0x30, _der(0x0C, kind.encode()))
    return _der(0x30, parts)


# --- building blocks -----------------------------------------------------------------


@attrs.frozen
class _Issuer:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, name: str) -> _Issuer:
        key = _new_key()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dovenotify tests"),
            ]
        )
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=2))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def issue(
        self,
        subject: x509.Name,
        not_before: datetime,
        not_after: datetime,
        extensions: tuple[x509.ExtensionType, ...] = (),
    ) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
        key = _new_key()
        return self.sign(key.public_key(), subject, not_before, not_after, extensions), key

    def sign(
        self,
        public_key: rsa.RSAPublicKey,
        subject: x509.Name,
        not_before: datetime,
        not_after: datetime,
        extensions: tuple[x509.ExtensionType, ...] = (),
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(self.key, hashes.SHA256())


def _apple_subject(uid: str, common_name: str) -> x509.Name:
    # Apple's order: UID first, then CN (rfc4514 strings print it reversed).
    return x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, uid),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_client(stem: Path, issued: tuple[x509.Certificate, rsa.RSAPrivateKey]) -> ClientCert:
    certificate, key = issued
    cert_pem, key_pem = _cert_pem(certificate), _key_pem(key)
    paths = {
        "combined_pem": stem.with_name(stem.name + ".pem"),
        "cert_pem": stem.with_name(stem.name + "-cert.pem"),
        "key_pem": stem.with_name(stem.name + "-key.pem"),
        "p12": stem.with_name(stem.name + ".p12"),
        "p12_with_password": stem.with_name(stem.name + "-password.p12"),
    }
    paths["combined_pem"].write_bytes(cert_pem + key_pem)
    paths["cert_pem"].write_bytes(cert_pem)
    paths["key_pem"].write_bytes(key_pem)
    name = b"dovenotify test"
    paths["p12"].write_bytes(
        pkcs12.serialize_key_and_certificates(
            name, key, certificate, None, serialization.NoEncryption()
        )
    )
    paths["p12_with_password"].write_bytes(
        pkcs12.serialize_key_and_certificates(
            name, key, certificate, None, serialization.BestAvailableEncryption(P12_PASSWORD)
        )
    )
    for path in paths.values():
        path.chmod(0o600)
    uid = certificate.subject.get_attributes_for_oid(NameOID.USER_ID)[0].value
    return ClientCert(
        topic=str(uid),
        p12_empty_password=_empty_password_p12(stem, paths["combined_pem"]),
        not_after=certificate.not_valid_after_utc,
        **paths,
    )


def _empty_password_p12(stem: Path, combined_pem: Path) -> Path | None:
    # cryptography refuses to encrypt with an empty password; the openssl CLI does it.
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    target = stem.with_name(stem.name + "-empty-password.p12")
    subprocess.run(
        [openssl, "pkcs12", "-export", "-passout", "pass:", "-in", combined_pem, "-out", target],
        check=True,
        capture_output=True,
    )
    return target


def _new_key() -> rsa.RSAPrivateKey:
    # RSA 2048, like Apple's push certificates.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _cert_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content
