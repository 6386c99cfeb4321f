"""APNs token authentication: ES256 JSON Web Tokens from a .p8 key (pure but for the clock).

Apple rejects a token older than an hour (403 ExpiredProviderToken) and one
renewed more often than every 20 minutes (429 TooManyProviderTokenUpdates), so a
token is reused for 50 minutes and only then replaced.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path

import attrs
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from dovenotify.apns.certificates import CertificateError

REFRESH_AFTER = 50 * 60
# Apple's floor between two tokens of one key.
MIN_TOKEN_AGE = 20 * 60


def load_token_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The .p8 key Apple hands out: PKCS#8 PEM, EC P-256."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CertificateError(f"{path}: cannot read: {error.strerror or error}") from error
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        raise CertificateError(f"{path}: not an APNs .p8 key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise CertificateError(f"{path}: an APNs .p8 key is an EC P-256 key; this one is not")
    return key


def make_token(key: ec.EllipticCurvePrivateKey, key_id: str, team_id: str, now: float) -> str:
    header = _b64(json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":")).encode())
    claims = _b64(json.dumps({"iss": team_id, "iat": int(now)}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode()
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    # JWS wants r and s as two fixed-size big-endian numbers, not DER.
    return f"{header}.{claims}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def verify_token(token: str, public_key: ec.EllipticCurvePublicKey) -> tuple[dict, dict]:
    """(header, claims) of a valid token; ValueError naming what is wrong otherwise."""
    try:
        header, claims, signature = token.split(".")
        raw = _unb64(signature)
        header_json, claims_json = json.loads(_unb64(header)), json.loads(_unb64(claims))
    except ValueError as error:
        raise ValueError(f"malformed token: {error}") from error
    if header_json.get("alg") != "ES256" or len(raw) != 64:
        raise ValueError("not an ES256 token")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public_key.verify(der, f"{header}.{claims}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as error:
        raise ValueError("bad signature") from error
    return header_json, claims_json


@attrs.define
class TokenSigner:
    key: ec.EllipticCurvePrivateKey
    key_id: str
    team_id: str
    clock: Callable[[], float] = time.time
    _token: str | None = None
    _issued_at: float = 0.0

    def token(self) -> str:
        now = self.clock()
        if self._token is None or now - self._issued_at >= REFRESH_AFTER:
            self._token = make_token(self.key, self.key_id, self.team_id, now)
            self._issued_at = now
        return self._token

    def expired(self) -> bool:
        """APNs called the token expired: renew it, unless that would be too soon."""
        if self.clock() - self._issued_at < MIN_TOKEN_AGE:
            return False
        self._token = None
        return True


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
