"""The one owner of what this process remembers per account: its cached token and its holds.

Invariant: whatever voids an account's token (deleted, new credentials, a VERSION moved on another
replica) drops the token, the holds and the forced-refresh mark together, in one place.
"""

from __future__ import annotations

from service.tokens.cache import TokenCache
from service.tokens.holds import HoldBook


class AccountMemory:
    def __init__(self, tokens: TokenCache, holds: HoldBook) -> None:
        self.tokens = tokens
        self.holds = holds

    def forget(self, account_id: str) -> None:
        self.tokens.drop(account_id)
        self.holds.forget(account_id)

    def apply_versions(self, versions: dict[str, int]) -> None:
        """Forget accounts deleted or changed elsewhere (``versions``: every account's VERSION now)."""
        for account_id, entry in self.tokens.items():
            if versions.get(account_id, -1) != entry.version:
                self.forget(account_id)
        self.holds.prune(versions)
