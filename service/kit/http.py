"""HTTP constants every feature shares: what a response that carries a secret must say to caches."""

from __future__ import annotations

# A token, a key or an authorization URL with its state must not be kept by any cache on the way.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
