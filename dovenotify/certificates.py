"""APNs client credentials: load a certificate and key (PEM or PKCS#12), find the topic.

Loading checks what would otherwise surface later as an opaque TLS failure or a
403 from Apple: that the key belongs to the certificate and that the certificate
names a topic. Expiry is not a load error: an expired certificate is still worth
loading to report it (`Credentials.days_left`, `Credentials.is_expired`).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import ssl
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from . import service_files

# No DSA: APNs certificates are RSA or EC, and naming cryptography's DSA class
# warns on every command since cryptography 51 deprecated it. A DSA key is refused
# as an unsupported key type.
PrivateKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

# Apple's "topics" extension on universal push certificates: lists the topic and
# its variants (topic.voip, topic.complication).
TOPICS_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.6")
# Apple marks which APNs environment a push certificate is good for.
DEVELOPMENT_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.1")
PRODUCTION_OID = x509.ObjectIdentifier("1.2.840.113635.100.6.3.2")
LEGACY_MAIL_TOPIC = "com.apple.mail.XServer."


class CertificateError(Exception):
    """The credentials cannot be used; the message names the file and the problem."""


@attrs.frozen
class Credentials:
    certificate: x509.Certificate
    private_key: PrivateKey
    # Intermediates shipped with the certificate (sent to APNs after the leaf).
    chain: tuple[x509.Certificate, ...]
    # The subject UID: what goes into the apns-topic header.
    topic: str
    # From the topics extension when present, else empty.
    topics: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    source: Path

    def days_left(self, at: datetime | None = None) -> float:
        """Days until expiry at `at` (default now); negative once expired."""
        at = at or datetime.now(UTC)
        return (self.not_after - at).total_seconds() / 86400

    def is_expired(self, at: datetime | None = None) -> bool:
        return self.days_left(at) < 0

    @property
    def expired(self) -> bool:
        return self.is_expired()

    def chain_pem(self) -> bytes:
        """The certificate, then what came with it, as PEM."""
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.chain)
        )

    def pem(self) -> bytes:
        """Certificate, chain and unencrypted key: one file the service can load."""
        return self.chain_pem() + private_pem(self.private_key)


def load_credentials(
    certificate: Path, key: Path | None = None, password: bytes | None = None
) -> Credentials:
    """Load APNs client credentials.

    `certificate` is a PEM file (certificate, optionally with its key and chain), a
    PKCS#12 file (.p12/.pfx), or a DER certificate (the .cer Apple's developer portal
    hands out, whose key stayed with whoever made the request: `dovenotify cert
    request`). `key` is a separate PEM key file. `password` decrypts
    the PKCS#12 file or an encrypted PEM key; PKCS#12 files without a password and
    with an empty one both load with `password=None`.
    """
    certificate = Path(certificate)
    data = _read(certificate)
    if b"-----BEGIN" in data:
        leaf, private_key, chain = _load_pem(certificate, data, key, password)
    elif (der := _der_certificate(data)) is not None:
        if key is None:
            raise CertificateError(
                f"{certificate}: this certificate file holds no key: give the key made with"
                " the request (`--key`, e.g. the .key file `dovenotify cert request` wrote)"
            )
        leaf, private_key, chain = der, _load_pem_key(key, _read(key), password), []
    else:
        leaf, private_key, chain = _load_pkcs12(certificate, data, password)
        if key is not None:
            # A separate key file overrides the one inside the PKCS#12 file.
            private_key = _load_pem_key(key, _read(key), password)
    return credentials_from(leaf, private_key, chain, certificate, key)


def credentials_from(
    leaf: x509.Certificate,
    private_key: object,
    chain: list[x509.Certificate],
    certificate: Path,
    key: Path | None = None,
) -> Credentials:
    """Check a certificate and key found somewhere (`certificate` names where)."""
    with _damaged(certificate):
        return _checked(leaf, private_key, chain, certificate, key)


def _checked(
    leaf: x509.Certificate,
    private_key: object,
    chain: list[x509.Certificate],
    certificate: Path,
    key: Path | None,
) -> Credentials:
    if private_key is None:
        raise CertificateError(
            f"{certificate}: no private key found (give the key file, or a file holding both)"
        )
    if not isinstance(private_key, PrivateKey):
        raise CertificateError(f"{certificate}: unsupported key type {type(private_key).__name__}")
    if _public_der(leaf.public_key()) != _public_der(private_key.public_key()):
        if key is not None:
            problem = f"{key}: this private key does not belong to the certificate in {certificate}"
        else:
            problem = f"{certificate}: the private key does not belong to the certificate"
        raise CertificateError(problem)
    topic = _subject_uid(leaf)
    if not topic:
        raise CertificateError(
            f"{certificate}: the certificate has no UID in its subject "
            f"({leaf.subject.rfc4514_string()}), so it names no APNs topic"
        )
    credentials = Credentials(
        certificate=leaf,
        private_key=private_key,
        chain=tuple(chain),
        topic=topic,
        topics=_topics(leaf),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        source=certificate,
    )
    # What cryptography reads, OpenSSL may still refuse (a weak signature or key, a
    # part it parses more strictly): say so now, not when the service connects.
    try:
        with _cert_chain_file(credentials) as (path, password):
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(path, password=password)
    except ssl.SSLError as error:
        problem = f"{certificate}: OpenSSL refuses this certificate ({error})"
        raise CertificateError(problem) from error
    return credentials


# What Apple grants mail providers today (see README: Certificates).
MAIL_PUSH_TOPIC_PREFIX = "com.apple.mobilemail.push."
_REVERSED_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+")


def topic_problem(topic: str) -> str | None:
    """Why `topic` is not one Apple would grant a mail server, or None."""
    if not topic.startswith(MAIL_PUSH_TOPIC_PREFIX):
        return (
            f"{topic!r} does not start with {MAIL_PUSH_TOPIC_PREFIX}: iOS Mail only acts on"
            f" pushes for {MAIL_PUSH_TOPIC_PREFIX}<your domain reversed>, e.g."
            f" {MAIL_PUSH_TOPIC_PREFIX}org.example"
        )
    if not _REVERSED_DOMAIN.fullmatch(topic.removeprefix(MAIL_PUSH_TOPIC_PREFIX)):
        return (
            f"{topic!r} does not end in a reversed domain name (lower case, at least two"
            f" parts, e.g. {MAIL_PUSH_TOPIC_PREFIX}org.example)"
        )
    return None


def certificate_request(topic: str) -> tuple[rsa.RSAPrivateKey, x509.CertificateSigningRequest]:
    """A new key and the CSR to upload to Apple's developer portal for `topic`.

    RSA 2048 is what the portal expects (its own instructions make the request in
    Keychain Access with those settings); Apple sets the subject of the certificate
    itself, so the CSR's only carries the topic as a reminder of what it is for.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, topic)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr


def client_ssl_context(
    credentials: Credentials | None, ca_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS client context for APNs: TLS 1.2+, ALPN h2, system trust plus `ca_file`.

    Without credentials (token authentication) no client certificate is presented.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if credentials is not None:
        # In TLS 1.2 a server that refuses the client certificate says so during the
        # handshake; in 1.3 the refusal comes after it and shows up as a broken pipe
        # on the first request, indistinguishable from a network failure.
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with _cert_chain_file(credentials) as (path, password):
            context.load_cert_chain(path, password=password)
    return context


def environment(credentials: Credentials) -> str:
    """Which APNs environment the certificate is for, as far as it says."""
    present = {e.oid for e in credentials.certificate.extensions}
    sandbox, production = DEVELOPMENT_OID in present, PRODUCTION_OID in present
    if sandbox and production:
        return "sandbox and production"
    if sandbox:
        return "sandbox (development)"
    if production:
        return "production"
    if credentials.topic.startswith(LEGACY_MAIL_TOPIC):
        return "production (mail server certificate)"
    return "unknown"


def save_credentials(
    credentials: Credentials, certificate: Path, key: Path | None
) -> list[tuple[Path, service_files.Ownership]]:
    """Write certificate (and chain) and key as PEM, readable by the service (see
    service_files); the key goes into the certificate file unless `key` names a
    file of its own. Returns each file written with its owner and mode.

    Each file is replaced in one rename, so a service reloading at that moment reads
    the old pair or the new one, never half of one.
    """
    if key is None:
        return [(certificate, service_files.write(certificate, credentials.pem()))]
    return [
        (key, service_files.write(key, private_pem(credentials.private_key))),
        (certificate, service_files.write(certificate, credentials.chain_pem())),
    ]


def private_pem(private_key: PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- loading -------------------------------------------------------------------------


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"{path}: cannot read: {error.strerror or error}") from error


def _der_certificate(data: bytes) -> x509.Certificate | None:
    # A PKCS#12 file is DER too, but no X.509 certificate: only one of them loads.
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        return None


def _load_pem(
    path: Path, data: bytes, key: Path | None, password: bytes | None
) -> tuple[x509.Certificate, PrivateKey | None, list[x509.Certificate]]:
    if b"CERTIFICATE-----" not in data:
        raise CertificateError(f"{path}: no certificate in this PEM file (is it the key?)")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError as error:
        raise CertificateError(f"{path}: damaged PEM certificate ({error})") from error
    if key is not None:
        private_key = _load_pem_key(key, _read(key), password)
    elif b"PRIVATE KEY-----" in data:
        private_key = _load_pem_key(path, data, password)
    else:
        private_key = None
    with _damaged(path):
        leaf, chain = _split_leaf(certificates, private_key)
    return leaf, private_key, chain


def _load_pem_key(path: Path, data: bytes, password: bytes | None) -> PrivateKey:
    if b"PRIVATE KEY-----" not in data:
        raise CertificateError(f"{path}: no PEM private key in this file")
    try:
        private_key = serialization.load_pem_private_key(data, password=password or None)
    except TypeError as error:
        # cryptography raises TypeError for "encrypted but no password" and the reverse.
        if password:
            raise CertificateError(f"{path}: the key is not encrypted; give no password") from error
        raise CertificateError(f"{path}: the key is encrypted; a password is needed") from error
    except ValueError as error:
        if password:
            raise CertificateError(f"{path}: wrong password for the private key") from error
        raise CertificateError(f"{path}: cannot read the private key ({error})") from error
    except UnsupportedAlgorithm as error:
        raise CertificateError(f"{path}: unsupported private key ({error})") from error
    if not isinstance(private_key, PrivateKey):
        raise CertificateError(f"{path}: unsupported key type {type(private_key).__name__}")
    return private_key


def _load_pkcs12(
    path: Path, data: bytes, password: bytes | None
) -> tuple[x509.Certificate, PrivateKey | None, list[x509.Certificate]]:
    # "No password" and "empty password" are two encodings that tools mix up (xapsd
    # writes the latter); accept either when the caller gave none.
    attempts = [password] if password else [None, b""]
    for attempt in attempts:
        try:
            private_key, leaf, extra = pkcs12.load_key_and_certificates(data, attempt)
            break
        except ValueError:
            continue
    else:
        if not _looks_like_pkcs12(data):
            raise CertificateError(f"{path}: neither a PEM file nor a PKCS#12 file")
        if password:
            raise CertificateError(f"{path}: wrong password for the PKCS#12 file")
        raise CertificateError(f"{path}: the PKCS#12 file needs a password")
    if leaf is None:
        raise CertificateError(f"{path}: the PKCS#12 file holds no certificate")
    if private_key is not None and not isinstance(private_key, PrivateKey):
        raise CertificateError(f"{path}: unsupported key type {type(private_key).__name__}")
    return leaf, private_key, list(extra)


def _split_leaf(
    certificates: list[x509.Certificate], private_key: PrivateKey | None
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    # The leaf is the certificate the key belongs to, wherever it sits in the file;
    # without a key (reported later) assume the usual order, leaf first.
    if private_key is not None:
        wanted = _public_der(private_key.public_key())
        for index, candidate in enumerate(certificates):
            if _public_der(candidate.public_key()) == wanted:
                return candidate, certificates[:index] + certificates[index + 1 :]
    return certificates[0], certificates[1:]


@contextlib.contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """cryptography reads some parts of a certificate (subject, public key, extensions)
    only when they are first used: a damaged part fails there, not at loading."""
    try:
        yield
    except (ValueError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{path}: damaged certificate ({error})") from error


def _public_der(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _subject_uid(certificate: x509.Certificate) -> str:
    values = certificate.subject.get_attributes_for_oid(NameOID.USER_ID)
    if not values:
        return ""
    value = values[0].value
    return value.decode() if isinstance(value, bytes) else value.strip()


def _topics(certificate: x509.Certificate) -> tuple[str, ...]:
    """Topics from Apple's extension, empty when absent or not understood.

    The value is a SEQUENCE alternating UTF8String topics with a SEQUENCE holding
    that topic's kind: ("com.x", ("app",), "com.x.voip", ("voip",), ...). Only the
    direct strings are topics. Apple does not publish the ASN.1, so anything
    unexpected yields no topics rather than a load failure: the subject UID is
    what is used as apns-topic anyway.
    """
    try:
        extension = certificate.extensions.get_extension_for_oid(TOPICS_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return ()
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return ()
    try:
        tag, content, rest = _der_next(value.value)
        if tag != _DER_SEQUENCE or rest:
            return ()
        topics = []
        while content:
            tag, item, content = _der_next(content)
            if tag in _DER_STRING_TAGS:
                topics.append(item.decode("utf-8"))
        return tuple(topics)
    except (ValueError, UnicodeDecodeError):
        return ()


# --- minimal DER reading (just enough for the topics extension and PKCS#12 sniffing) -

_DER_SEQUENCE = 0x30
_DER_INTEGER = 0x02
# UTF8String, PrintableString, IA5String: what a topic could plausibly be encoded as.
_DER_STRING_TAGS = {0x0C, 0x13, 0x16}


def _der_next(data: bytes) -> tuple[int, bytes, bytes]:
    """Split one TLV off `data`: (tag, content, rest). Raises ValueError if malformed."""
    if len(data) < 2:
        raise ValueError("truncated DER")
    tag, length = data[0], data[1]
    offset = 2
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not expected here")
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(data) < 2 + count:
            raise ValueError("bad DER length")
        length = int.from_bytes(data[2 : 2 + count], "big")
        offset += count
    end = offset + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[offset:end], data[end:]


def _looks_like_pkcs12(data: bytes) -> bool:
    # PFX ::= SEQUENCE { version INTEGER (3), authSafe ContentInfo, macData ... }
    try:
        tag, content, _ = _der_next(data)
        if tag != _DER_SEQUENCE:
            return False
        tag, version, _ = _der_next(content)
        return tag == _DER_INTEGER and version == b"\x03"
    except ValueError:
        return False


# --- handing the credentials to ssl ---------------------------------------------------


@contextlib.contextmanager
def _cert_chain_file(credentials: Credentials) -> Iterator[tuple[str, bytes]]:
    """A path load_cert_chain can read, gone when the block ends.

    The ssl module only loads certificates from files. The key is written encrypted
    under a one-off password, and on Linux into an anonymous memory file, so nothing
    usable ever reaches a disk, even if the process dies before cleanup.
    """
    password = secrets.token_urlsafe(32).encode()
    pem = credentials.chain_pem() + credentials.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    if hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir():
        fd = os.memfd_create("dovenotify-apns-credentials")
        try:
            os.write(fd, pem)
            yield f"/proc/self/fd/{fd}", password
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="dovenotify-") as directory:
        path = Path(directory) / "credentials.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
        finally:
            os.close(fd)
        yield str(path), password
