"""The access tokens this process holds in memory, one per account.

Invariants:
* An entry is replaced only by one that expires no earlier or belongs to a newer VERSION of the
  account: a slow refresh that finishes late never puts an older token back.
* Each entry's refresh point is its expiry less the margin, less a random part of at most a fifth
  of the margin: refreshes spread out, but never start later than the margin allows.
* ``broker_token_cache_size`` is the number of entries after every change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from service.accounts.credentials import AccountSecrets
from service.errors import StorageUnavailable
from service.kit import sealing, timeutil
from service.metrics import Metrics
from service.models import Account, AccountState
from service.tokens.response import CachedToken


class TokenCache:
    def __init__(
        self, *, margin: float, rng: Callable[[], float], secrets: AccountSecrets, metrics: Metrics
    ) -> None:
        self._margin = margin
        self._rng = rng
        self._secrets = secrets
        self._metrics = metrics
        self._entries: dict[str, CachedToken] = {}

    def get(self, account_id: str) -> CachedToken | None:
        return self._entries.get(account_id)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, account_id: object) -> bool:
        return account_id in self._entries

    def items(self) -> Iterator[tuple[str, CachedToken]]:
        return iter(list(self._entries.items()))

    def store(self, entry: CachedToken) -> None:
        current = self._entries.get(entry.account_id)
        if current is None or current.expires_at <= entry.expires_at or current.version < entry.version:
            self._entries[entry.account_id] = entry
        self._metrics.cache_size.set(len(self._entries))

    def drop(self, account_id: str) -> None:
        self._entries.pop(account_id, None)
        self._metrics.cache_size.set(len(self._entries))

    def entry(
        self, account_id: str, token: str, expires_at: float, version: int, api_url: str, obtained: float
    ) -> CachedToken:
        margin = self._margin * (1 - self._rng() / 5)
        return CachedToken(account_id, token, expires_at, expires_at - margin, version, api_url, obtained)

    def from_row(self, account: Account, state: AccountState) -> CachedToken | None:
        """The stored access token as an entry (not stored here), or None without a readable one."""
        if not state.access_token or state.token_expires_at is None:
            return None
        try:
            token = self._secrets.unseal(sealing.ACCESS_TOKEN, account.id, state.access_token)
        except StorageUnavailable:
            return None
        obtained = timeutil.to_epoch(state.last_refreshed_at) if state.last_refreshed_at else 0.0
        expires = timeutil.to_epoch(state.token_expires_at)
        return self.entry(account.id, token or "", expires, account.version or 0, account.api_url, obtained)
