"""The OAuth ``state``: self-checking, so a request the broker never started costs no query.

Invariant: a state is ``<id>.<expiry>.<mac>`` where ``id`` is 32 random bytes (base64url),
``expiry`` the Unix second it stops being valid, and ``mac`` base64url(HMAC-SHA256(key,
"<id>.<expiry>")). The key is derived from the encryption keyring (HKDF, purpose
``oauth-state``): the primary's subkey signs, every ring key's verifies, so a state issued before
a key rotation still works on a replica that has rotated. ``check`` refuses a malformed, forged
or expired state from memory alone; only a state that passes is looked up (and consumed) in the
database, which still keeps it single-use and bound to its account.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Sequence

PURPOSE = "broker oauth-state v1"
_SHAPE = re.compile(r"([A-Za-z0-9_-]{43})\.([0-9]{10})\.([A-Za-z0-9_-]{43})")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class StateSigner:
    """Issues and checks states; ``keys`` come from ``Keyring.derive(PURPOSE)``."""

    def __init__(self, keys: Sequence[bytes], *, clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._keys = tuple(keys)
        self._clock = clock

    def issue(self, ttl_seconds: int) -> str:
        ident = secrets.token_urlsafe(32)
        expiry = f"{int(self._clock()) + ttl_seconds:010d}"
        return f"{ident}.{expiry}.{self._mac(self._keys[0], ident, expiry)}"

    def check(self, state: str) -> bool:
        """True when ``state`` was issued with one of the keys and has not expired."""
        match = _SHAPE.fullmatch(state)
        if match is None:
            return False
        ident, expiry, mac = match.groups()
        # Every key is tried (no early exit) so the time taken says nothing about which matched.
        valid = False
        for key in self._keys:
            valid |= hmac.compare_digest(self._mac(key, ident, expiry), mac)
        return valid and int(expiry) > self._clock()

    @staticmethod
    def _mac(key: bytes, ident: str, expiry: str) -> str:
        return _b64(hmac.new(key, f"{ident}.{expiry}".encode("ascii"), hashlib.sha256).digest())
