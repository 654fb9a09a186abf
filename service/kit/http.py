"""HTTP pieces every feature shares: what a response that carries a secret must say to caches,
and the caller's bearer credential read from raw ASGI headers (the layers below the framework)."""

from __future__ import annotations

# A token, a key or an authorization URL with its state must not be kept by any cache on the way.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def bearer_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header, or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            if scheme.lower() == b"bearer" and key.strip():
                return key.strip().decode("latin-1")
            return None
    return None
