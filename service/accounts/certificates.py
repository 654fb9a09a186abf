"""Certificate credentials: the admin's PEM checked once, and a fresh client assertion per request.

Invariants: a PEM is accepted only when it holds exactly one unencrypted RSA private key (PKCS#8 or
PKCS#1) and an X.509 certificate for that key that has not expired; the messages that refuse one
never quote it. A client assertion (RFC 7523, as Azure AD takes it) is signed PS256 by PyJWT on
``cryptography``, names the certificate by ``x5t#S256`` and lives at most ``ASSERTION_LIFETIME``;
every call makes a new ``jti`` and ``iat``, so an assertion is never reused.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import jwt
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 600  # seconds: Azure accepts at most 10 minutes
MIN_KEY_BITS = 2048
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\s.*?-----END \1-----", re.DOTALL)
_KEY_LABELS = ("PRIVATE KEY", "RSA PRIVATE KEY")


class CertificateError(ValueError):
    """Why a PEM is refused, in plain words (never its content)."""


@dataclass(frozen=True)
class Certificate:
    thumbprint: str  # x5t#S256: base64url SHA-256 of the DER certificate, no padding
    not_after: datetime  # naive UTC, as the database keeps it
    key: rsa.RSAPrivateKey = field(repr=False, compare=False)


def thumbprint(cert: x509.Certificate) -> str:
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _load_key(blocks: list[tuple[str, str]]) -> rsa.RSAPrivateKey:
    labels = [label for label, _ in blocks]
    if "ENCRYPTED PRIVATE KEY" in labels or any("Proc-Type: 4,ENCRYPTED" in b for _, b in blocks):
        raise CertificateError("the private key is encrypted; send it unencrypted (PKCS#8 or PKCS#1)")
    keys = [text for label, text in blocks if label in _KEY_LABELS]
    if "EC PRIVATE KEY" in labels:
        raise CertificateError("the private key must be RSA (Azure AD's client assertions are PS256)")
    if len(keys) != 1:
        raise CertificateError(
            "must hold exactly one private key (-----BEGIN PRIVATE KEY----- or "
            f"-----BEGIN RSA PRIVATE KEY-----), found {len(keys)}"
        )
    try:
        key = serialization.load_pem_private_key(keys[0].encode(), password=None)
    except TypeError:
        raise CertificateError("the private key is encrypted; send it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError("the private key does not parse") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateError("the private key must be RSA (Azure AD's client assertions are PS256)")
    if key.key_size < MIN_KEY_BITS:
        raise CertificateError(f"the RSA key has {key.key_size} bits; at least {MIN_KEY_BITS} are needed")
    return key


def parse(pem: str, *, now: datetime) -> Certificate:
    """The PEM's key and the certificate that matches it; ``now`` is naive UTC."""
    blocks = [(m[1], m[0]) for m in _BLOCK.finditer(pem)]
    key = _load_key(blocks)
    certs = [text for label, text in blocks if label == "CERTIFICATE"]
    if not certs:
        raise CertificateError("holds no certificate (-----BEGIN CERTIFICATE-----)")
    public = key.public_key().public_numbers()
    for text in certs:
        try:
            cert = x509.load_pem_x509_certificate(text.encode())
        except ValueError:
            raise CertificateError("a certificate does not parse") from None
        cert_key = cert.public_key()
        if isinstance(cert_key, rsa.RSAPublicKey) and cert_key.public_numbers() == public:
            break
    else:
        raise CertificateError("the private key does not match the certificate")
    not_after = cert.not_valid_after_utc.replace(tzinfo=None)
    if not_after <= now:
        raise CertificateError(f"the certificate expired on {not_after.isoformat()}Z")
    if cert.not_valid_before_utc.replace(tzinfo=None) > now:
        raise CertificateError("the certificate is not valid yet")
    return Certificate(thumbprint(cert), not_after, key)


def client_assertion(cert: Certificate, *, client_id: str, audience: str, now: float) -> str:
    """A new signed assertion for one token request to ``audience`` (the token URL)."""
    issued = int(now)
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "iat": issued,
        "nbf": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    return jwt.encode(
        claims, cert.key, algorithm="PS256", headers={"typ": "JWT", "x5t#S256": cert.thumbprint}
    )
