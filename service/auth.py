"""Caller keys in memory: who a bearer key is, what role it has, which accounts it may use.

Keys are known only by their SHA-256 hash. A lookup hashes the presented key in full and finds
the entry by that hash, then compares the hashes with ``hmac.compare_digest``: the work does not
depend on how much of a key is right. Keys from the environment are unscoped and permanent;
keys from the database are reloaded by ``KeyStore.replace_managed`` (every replica, every few
seconds) and changed at once on the replica that changed them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

ADMIN = "admin"
CLIENT = "client"


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(raw: str) -> str:
    """A short, non-secret name for a key, safe for logs and events."""
    return "k_" + hash_key(raw)[:10]


def new_key() -> str:
    # 32 random bytes (256 bits); the prefix makes a leaked key recognisable in a scan.
    return "tbk_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None for keys from the environment
    role: str
    accounts: frozenset[str] | None  # None: every account
    fingerprint: str
    key_hash: str = field(repr=False)

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    def may_use(self, account_id: str) -> bool:
        return self.accounts is None or account_id in self.accounts


class KeyStore:
    """The keys this replica accepts. Mutated only by replacing whole entries (no awaits)."""

    def __init__(self, *, admin_keys: Iterable[str] = (), client_keys: Iterable[str] = ()) -> None:
        self._static: dict[str, Principal] = {}
        for role, keys in ((CLIENT, client_keys), (ADMIN, admin_keys)):
            for raw in keys:
                digest = hash_key(raw)
                self._static[digest] = Principal(None, role, None, fingerprint(raw), digest)
        self._managed: dict[str, Principal] = {}
        self._by_hash: dict[str, Principal] = dict(self._static)
        self._used: dict[str, float] = {}

    def lookup(self, raw: str) -> Principal | None:
        digest = hash_key(raw)
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found.key_hash, digest):
            return None
        if found.key_id is not None:
            self._used[found.key_id] = time.time()
        return found

    def replace_managed(self, principals: Iterable[Principal]) -> None:
        managed = {p.key_hash: p for p in principals}
        merged = dict(managed)
        merged.update(self._static)  # environment keys win a (practically impossible) collision
        self._managed = managed
        self._by_hash = merged

    def put(self, principal: Principal) -> None:
        self.replace_managed(
            [*(p for p in self._managed.values() if p.key_id != principal.key_id), principal]
        )

    def remove(self, key_id: str) -> None:
        self.replace_managed(p for p in self._managed.values() if p.key_id != key_id)

    def drop_account(self, account_id: str) -> None:
        self.replace_managed(
            p
            if p.accounts is None or account_id not in p.accounts
            else Principal(p.key_id, p.role, p.accounts - {account_id}, p.fingerprint, p.key_hash)
            for p in self._managed.values()
        )

    def take_usage(self) -> dict[str, float]:
        """The keys used since the last call, with when; the caller persists them."""
        used, self._used = self._used, {}
        return used

    @property
    def has_static_admin(self) -> bool:
        return any(p.role == ADMIN for p in self._static.values())
