"""Encryption at rest: format, AAD binding, key rotation and secret-free errors."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.errors import ConfigurationError
from service.kit.crypto import DecryptionError, Keyring, KeyringError, UnknownKeyError, generate_key, key_id

CONTEXT = "ms_dynamics_365_data.CLIENT_SECRET:42"
SECRET = "s3cr3t-client-secret~value"


def _id_of(key_text: str) -> str:
    raw = base64.urlsafe_b64decode(key_text + "=" * (-len(key_text) % 4))
    return hashlib.sha256(raw).hexdigest()[:8]


def _payload(token: str) -> bytearray:
    text = token.split(".")[2]
    return bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))


def _with_payload(token: str, payload: bytes) -> str:
    version, kid, _ = token.split(".")
    return f"{version}.{kid}.{base64.urlsafe_b64encode(payload).rstrip(b'=').decode()}"


def test_round_trip() -> None:
    """A value encrypted under a context decrypts to itself under that context."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt(SECRET, context=CONTEXT)
    assert SECRET not in token
    assert ring.decrypt(token, context=CONTEXT) == SECRET


def test_empty_and_unicode_plaintexts_round_trip() -> None:
    """The empty string and non-ASCII text round-trip."""
    ring = Keyring.from_strings([generate_key()])
    for text in ("", "ключ-🔑-\x00-end"):
        assert ring.decrypt(ring.encrypt(text, context=CONTEXT), context=CONTEXT) == text


@given(plaintext=st.text(), context=st.text())
@settings(max_examples=200, deadline=None)
def test_round_trip_property(plaintext: str, context: str) -> None:
    """Any text round-trips under any context, in the documented format."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt(plaintext, context=context)
    assert token.startswith(f"v1.{ring.primary_key_id}.")
    assert Keyring.key_id_of(token) == ring.primary_key_id
    assert ring.decrypt(token, context=context) == plaintext


def test_format_and_key_id() -> None:
    """Tokens are v1.<first 8 hex of SHA-256 of the key>.<unpadded url-safe base64>."""
    key = generate_key()
    ring = Keyring.from_strings([key])
    token = ring.encrypt(SECRET, context=CONTEXT)
    version, kid, payload = token.split(".")
    assert (version, kid) == ("v1", _id_of(key))
    assert ring.primary_key_id == key_id(base64.urlsafe_b64decode(key)) == kid
    assert "=" not in payload
    assert len(_payload(token)) == 12 + len(SECRET.encode()) + 16


def test_wrong_context_fails() -> None:
    """A ciphertext moved to another row or column does not decrypt, and the error names the column."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt(SECRET, context=CONTEXT)
    for other in ("ms_dynamics_365_data.CLIENT_SECRET:43", "ms_dynamics_365_data.REFRESH_TOKEN:42", ""):
        with pytest.raises(DecryptionError) as info:
            ring.decrypt(token, context=other)
        assert not isinstance(info.value, UnknownKeyError)
        assert ring.primary_key_id in str(info.value)
        assert SECRET not in str(info.value)
    with pytest.raises(DecryptionError, match=r"ms_dynamics_365_data\.REFRESH_TOKEN"):
        ring.decrypt(token, context="ms_dynamics_365_data.REFRESH_TOKEN:42")


def test_tampered_ciphertext_fails() -> None:
    """Flipping any byte of nonce, ciphertext or tag, or truncating, makes decryption fail."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt(SECRET, context=CONTEXT)
    original = _payload(token)
    for index in (0, 11, 12, len(original) - 17, len(original) - 1):
        altered = bytearray(original)
        altered[index] ^= 0x01
        with pytest.raises(DecryptionError, match=ring.primary_key_id) as info:
            ring.decrypt(_with_payload(token, bytes(altered)), context=CONTEXT)
        assert SECRET not in str(info.value)
    with pytest.raises(DecryptionError):
        ring.decrypt(_with_payload(token, bytes(original[:-1])), context=CONTEXT)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain-text-secret",
        "v2.abcdef12.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.ABCDEF12.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.abcdef12.short",
        "v1.abcdef12.AAAA=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "v1.abcdef12.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.extra",
    ],
)
def test_malformed_text_fails(text: str) -> None:
    """Text that is not a broker ciphertext raises DecryptionError saying so."""
    ring = Keyring.from_strings([generate_key()])
    with pytest.raises(DecryptionError, match="not a broker ciphertext"):
        ring.decrypt(text, context=CONTEXT)


def test_non_canonical_payload_spelling_fails() -> None:
    """A payload whose unused trailing base64 bits are altered is rejected rather than accepted."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt("x", context=CONTEXT)  # 29 bytes: the last base64 character has spare bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    variant = token[:-1] + alphabet[last ^ 0x01]
    with pytest.raises(DecryptionError, match="not a broker ciphertext"):
        ring.decrypt(variant, context=CONTEXT)


def test_new_old_ring_decrypts_old_and_encrypts_with_new() -> None:
    """A ring [new, old] decrypts old ciphertexts and encrypts only with the new key."""
    old, new = generate_key(), generate_key()
    old_token = Keyring.from_strings([old]).encrypt(SECRET, context=CONTEXT)
    ring = Keyring.from_strings([new, old])
    assert ring.primary_key_id == _id_of(new)
    assert ring.key_ids == (_id_of(new), _id_of(old))
    assert ring.decrypt(old_token, context=CONTEXT) == SECRET
    assert ring.needs_rotation(old_token)
    new_token = ring.encrypt(SECRET, context=CONTEXT)
    assert Keyring.key_id_of(new_token) == _id_of(new)
    assert not ring.needs_rotation(new_token)


def test_rotate_then_drop_old_key() -> None:
    """After rotate() every value decrypts with a ring that no longer holds the old key."""
    old, new = generate_key(), generate_key()
    before = Keyring.from_strings([old])
    stored = {f"ms_dynamics_365_data.CLIENT_SECRET:{i}": f"secret-{i}" for i in range(5)}
    tokens = {ctx: before.encrypt(value, context=ctx) for ctx, value in stored.items()}

    during = Keyring.from_strings([new, old])
    rotated = {}
    for ctx, token in tokens.items():
        assert during.needs_rotation(token)
        rotated[ctx] = during.rotate(token, context=ctx)
        assert not during.needs_rotation(rotated[ctx])

    after = Keyring.from_strings([new])
    for ctx, token in rotated.items():
        assert after.decrypt(token, context=ctx) == stored[ctx]
    with pytest.raises(UnknownKeyError):
        after.decrypt(next(iter(tokens.values())), context=next(iter(tokens)))


def test_needs_rotation_for_foreign_text() -> None:
    """Text that is not a broker ciphertext needs rotation, and rotating it fails loudly."""
    ring = Keyring.from_strings([generate_key()])
    assert Keyring.key_id_of("plain") is None
    assert ring.needs_rotation("plain")
    with pytest.raises(DecryptionError, match="not a broker ciphertext"):
        ring.rotate("plain", context=CONTEXT)


def test_unknown_key_id_error_names_id_not_secret() -> None:
    """Decrypting under a key id absent from the ring names that id and no secret."""
    foreign_key, ring_key = generate_key(), generate_key()
    token = Keyring.from_strings([foreign_key]).encrypt(SECRET, context=CONTEXT)
    ring = Keyring.from_strings([ring_key])
    with pytest.raises(UnknownKeyError) as info:
        ring.decrypt(token, context=CONTEXT)
    message = str(info.value)
    foreign_id = _id_of(foreign_key)
    assert f"encrypted with key id {foreign_id}, which is not in BROKER_ENCRYPTION_KEYS" in message
    assert info.value.key_id == foreign_id
    assert isinstance(info.value, DecryptionError)
    assert isinstance(info.value, ConfigurationError)
    for secret in (SECRET, foreign_key, ring_key, foreign_key.rstrip("=")):
        assert secret not in message


def test_same_id_different_key_fails_cleanly() -> None:
    """A ciphertext whose id matches a ring key but whose key differs raises DecryptionError."""
    ring = Keyring.from_strings([generate_key()])
    impostor = Keyring.from_strings([generate_key()]).encrypt(SECRET, context=CONTEXT)
    forged = f"v1.{ring.primary_key_id}.{impostor.split('.')[2]}"
    with pytest.raises(DecryptionError, match=ring.primary_key_id) as info:
        ring.decrypt(forged, context=CONTEXT)
    assert not isinstance(info.value, UnknownKeyError)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("not base64!!", "not URL-safe base64"),
        ("abc+def/ghi", "not URL-safe base64"),
        ("A", "not URL-safe base64"),
        (base64.urlsafe_b64encode(b"k" * 16).decode(), "16 bytes, expected 32"),
        (base64.urlsafe_b64encode(b"k" * 33).decode(), "33 bytes, expected 32"),
        ("   ", "empty"),
    ],
)
def test_invalid_key_error_names_position_not_key(bad: str, reason: str) -> None:
    """An invalid key raises KeyringError naming its 1-based position and why, never the text."""
    with pytest.raises(KeyringError) as info:
        Keyring.from_strings([generate_key(), bad])
    message = str(info.value)
    assert "entry 2" in message
    assert reason in message
    if bad.strip():
        assert bad not in message
        assert bad.rstrip("=") not in message
    assert isinstance(info.value, ConfigurationError)
    # No chained decoder exception may carry the key text into a traceback.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_empty_ring_rejected() -> None:
    """An empty key list raises KeyringError."""
    with pytest.raises(KeyringError, match="empty"):
        Keyring.from_strings([])


def test_padding_optional_and_duplicates_harmless() -> None:
    """Keys are accepted with or without '=' padding, and a repeated key changes nothing."""
    key = generate_key()
    assert key.endswith("=")
    ring = Keyring.from_strings([key.rstrip("="), key, f"  {key} "])
    assert ring.key_ids == (_id_of(key),)
    token = Keyring.from_strings([key]).encrypt(SECRET, context=CONTEXT)
    assert ring.decrypt(token, context=CONTEXT) == SECRET


def test_length_bound_for_128_byte_plaintext() -> None:
    """A 128-byte plaintext encrypts to at most 255 characters."""
    ring = Keyring.from_strings([generate_key()])
    token = ring.encrypt("x" * 128, context=CONTEXT)
    assert len(token) <= 255
    multibyte = "é" * 64  # 128 bytes of UTF-8
    assert len(multibyte.encode()) == 128
    assert len(ring.encrypt(multibyte, context=CONTEXT)) <= 255


def test_repr_hides_key_material() -> None:
    """repr() and str() of a Keyring show key ids only, never key text or bytes."""
    keys = [generate_key(), generate_key()]
    ring = Keyring.from_strings(keys)
    for shown in (repr(ring), str(ring), f"{ring!r}"):
        for key in keys:
            raw = base64.urlsafe_b64decode(key)
            assert key not in shown
            assert key.rstrip("=") not in shown
            assert repr(raw) not in shown
            assert raw.hex() not in shown
            assert _id_of(key) in shown


def test_nonces_differ() -> None:
    """Two encryptions of the same text under the same context use different nonces."""
    ring = Keyring.from_strings([generate_key()])
    first, second = (ring.encrypt(SECRET, context=CONTEXT) for _ in range(2))
    assert first != second
    assert _payload(first)[:12] != _payload(second)[:12]


def test_generate_key_produces_valid_distinct_keys() -> None:
    """generate_key() returns distinct URL-safe base64 texts of 32 bytes that a Keyring accepts."""
    keys = {generate_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert len(base64.urlsafe_b64decode(key)) == 32
        assert set(key) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    ring = Keyring.from_strings(sorted(keys))
    assert len(ring.key_ids) == 50


def test_raw_key_length_checked() -> None:
    """Building a Keyring from raw bytes of the wrong length names the position."""
    with pytest.raises(KeyringError, match="entry 1"):
        Keyring([os.urandom(16)])
