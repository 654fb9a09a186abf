"""Encryption at rest for client secrets, refresh tokens and cached access tokens.

Invariant: every stored secret is the text ``v1.<key id>.<payload>`` where

* ``key id`` is the first 8 hex digits of SHA-256 over the raw 32-byte key that encrypted it
  (not secret: it is safe to log and tells an operator which key a row needs), and
* ``payload`` is URL-safe base64 without padding of ``nonce (12 bytes) || ciphertext || tag (16)``
  from AES-256-GCM, with the caller's ``context`` (e.g.
  ``"ms_dynamics_365_data.CLIENT_SECRET:<row id>"``) as associated data, so a ciphertext copied
  into another row or column fails to decrypt instead of silently yielding the wrong secret.

A :class:`Keyring` is built from ``BROKER_ENCRYPTION_KEYS`` (32 random bytes each, URL-safe base64,
padding optional). Only the first key encrypts; every key in the ring decrypts. Rotation is
therefore: put a new key first, :meth:`Keyring.rotate` every stored value, then drop the old key.
Errors name key ids, list positions and columns, never key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from collections.abc import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.errors import ConfigurationError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
VERSION = "v1"

_KEY_TEXT = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_TOKEN = re.compile(r"v1\.([0-9a-f]{8})\.([A-Za-z0-9_-]+)")


class KeyringError(ConfigurationError):
    """``BROKER_ENCRYPTION_KEYS`` is empty or holds an entry that is not a valid key."""


class DecryptionError(ConfigurationError):
    """A stored value cannot be decrypted: wrong key, wrong context, tampering or not ours."""

    def __init__(self, message: str, *, key_id: str | None = None) -> None:
        super().__init__(message)
        self.key_id = key_id


class UnknownKeyError(DecryptionError):
    """The value was encrypted with a key that is not (or no longer) in the ring."""


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode URL-safe base64 with or without padding; ``ValueError`` if it is not that."""
    if not _KEY_TEXT.fullmatch(text):
        raise ValueError("it is not URL-safe base64")
    bare = text.rstrip("=")
    if len(bare) % 4 == 1:
        raise ValueError("it is not URL-safe base64 (truncated)")
    try:
        return base64.urlsafe_b64decode(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("it is not URL-safe base64") from None


def generate_key() -> str:
    """A new random key in the text form ``BROKER_ENCRYPTION_KEYS`` expects."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(raw_key: bytes) -> str:
    """The non-secret id of a raw key: first 8 hex digits of its SHA-256."""
    return hashlib.sha256(raw_key).hexdigest()[:8]


def _column(context: str) -> str:
    # The row id is dropped: the column is what an operator needs, and messages stay short.
    return context.split(":", 1)[0]


class Keyring:
    """An ordered set of AES-256-GCM keys: the first encrypts, all of them decrypt."""

    def __init__(self, raw_keys: Sequence[bytes]) -> None:
        if not raw_keys:
            raise KeyringError("BROKER_ENCRYPTION_KEYS is empty: at least one key is required")
        seen: set[bytes] = set()
        self._raw: list[bytes] = []
        self._by_id: dict[str, list[AESGCM]] = {}
        for position, raw in enumerate(raw_keys, start=1):
            if len(raw) != KEY_BYTES:
                raise KeyringError(
                    f"BROKER_ENCRYPTION_KEYS entry {position} is not a valid key: "
                    f"it is {len(raw)} bytes, expected {KEY_BYTES}"
                )
            if raw in seen:  # a repeated key would only cost a second failed attempt
                continue
            seen.add(raw)
            self._raw.append(raw)
            # A list per id: two keys sharing an id is a 2**-32 accident, but if it happens
            # both must still be tried rather than one shadowing the other.
            self._by_id.setdefault(key_id(raw), []).append(AESGCM(raw))
        self._primary = AESGCM(raw_keys[0])
        self.primary_key_id: str = key_id(raw_keys[0])
        self.key_ids: tuple[str, ...] = tuple(self._by_id)

    @classmethod
    def from_strings(cls, keys: Iterable[str]) -> Keyring:
        """Parse key texts (URL-safe base64 of 32 bytes, padding optional) in ring order."""
        raw_keys: list[bytes] = []
        for position, entry in enumerate(keys, start=1):
            text = entry.strip()
            if not text:
                raise KeyringError(f"BROKER_ENCRYPTION_KEYS entry {position} is not a valid key: it is empty")
            try:
                raw_keys.append(_b64decode(text))
            except ValueError as exc:
                # `from None`: the decoder's own exception could quote the key text.
                raise KeyringError(
                    f"BROKER_ENCRYPTION_KEYS entry {position} is not a valid key: {exc}"
                ) from None
        return cls(raw_keys)

    def __repr__(self) -> str:
        return f"Keyring(primary_key_id={self.primary_key_id!r}, key_ids={self.key_ids!r})"

    def derive(self, purpose: str) -> tuple[bytes, ...]:
        """32-byte subkeys for ``purpose`` (HKDF-SHA256), one per ring key, the primary's first.

        For MACs that every replica sharing the ring must agree on (OAuth states, caller-key tags),
        also during a rotation: sign with the first, accept any. A subkey reveals nothing about the
        encryption key it came from, and an encryption key is never used as a MAC key as it is."""
        return tuple(
            HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose.encode()).derive(raw)
            for raw in self._raw
        )

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """Encrypt with the primary key, bound to ``context``."""
        # Random 96-bit nonces: safe for far more than the ~2**32 messages per key this will see.
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._primary.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return f"{VERSION}.{self.primary_key_id}.{_b64encode(nonce + sealed)}"

    def decrypt(self, token: str, *, context: str) -> str:
        """Decrypt a value made by any key of the ring under the same ``context``."""
        kid, payload = self._parse(token)
        candidates = self._by_id.get(kid)
        if candidates is None:
            raise UnknownKeyError(
                f"{_column(context)} value was encrypted with key id {kid}, "
                "which is not in BROKER_ENCRYPTION_KEYS",
                key_id=kid,
            )
        nonce, sealed = payload[:NONCE_BYTES], payload[NONCE_BYTES:]
        for aead in candidates:
            try:
                plain = aead.decrypt(nonce, sealed, context.encode("utf-8"))
            except InvalidTag:
                continue
            try:
                return plain.decode("utf-8")
            except UnicodeDecodeError:  # authentic yet not UTF-8: not something encrypt() made
                break
        raise DecryptionError(
            f"cannot decrypt {_column(context)} value encrypted with key id {kid}: it was altered, "
            "belongs to another row or column, or the key with that id is not the one that made it",
            key_id=kid,
        )

    def needs_rotation(self, token: str) -> bool:
        """True unless ``token`` is a broker ciphertext made with the primary key.

        Text that is not a broker ciphertext at all also answers True, so that a rotation sweep
        hands it to :meth:`rotate`, which fails loudly instead of the sweep skipping it silently.
        """
        return self.key_id_of(token) != self.primary_key_id

    def rotate(self, token: str, *, context: str) -> str:
        """Decrypt with whichever ring key made ``token`` and re-encrypt with the primary."""
        return self.encrypt(self.decrypt(token, context=context), context=context)

    @staticmethod
    def key_id_of(token: str) -> str | None:
        """The key id inside a broker ciphertext, or None if ``token`` is not in that format."""
        match = _TOKEN.fullmatch(token)
        return match.group(1) if match else None

    @staticmethod
    def _parse(token: str) -> tuple[str, bytes]:
        match = _TOKEN.fullmatch(token)
        if match is not None:
            kid, text = match.groups()
            try:
                payload = _b64decode(text)
            except ValueError:
                payload = b""
            # The re-encoding check rejects variant spellings of the same bytes, so a stored
            # value has exactly one valid form.
            if len(payload) >= NONCE_BYTES + TAG_BYTES and _b64encode(payload) == text:
                return kid, payload
        raise DecryptionError("not a broker ciphertext (expected 'v1.<key id>.<payload>')")
