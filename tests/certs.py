"""Test certificates made with ``cryptography`` at run time (no key material is checked in)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Cert:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def key_pem(self, *, pkcs1: bool = False) -> str:
        fmt = serialization.PrivateFormat.TraditionalOpenSSL if pkcs1 else serialization.PrivateFormat.PKCS8
        return self.key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()).decode()

    def pem(self, *, pkcs1: bool = False) -> str:
        """What an admin sends: the private key and its certificate in one PEM."""
        return self.key_pem(pkcs1=pkcs1) + self.cert_pem


@functools.cache
def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    """The n-th test key (keys are slow to make: each is made once per run)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def certificate(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | None = None,
    *,
    days: float = 365,
    starts: timedelta = timedelta(days=-1),
    name: str = "broker-test",
    signer: rsa.RSAPrivateKey | None = None,
) -> x509.Certificate:
    """A self-signed certificate for ``key`` valid from now+``starts`` for ``days`` more days."""
    key = key or rsa_key()
    now = datetime.now(UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + starts)
        .not_valid_after(now + timedelta(days=days))
        .sign(signer or key, hashes.SHA256())  # type: ignore[arg-type]
    )


def make_cert(n: int = 0, **kwargs: object) -> Cert:
    key = rsa_key(n)
    return Cert(key, certificate(key, **kwargs))  # type: ignore[arg-type]
