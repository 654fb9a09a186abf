"""Why this process does not ask Azure about an account now: the hold book.

Invariants:
* A transient failure holds the account until its backoff ends (the time the database also
  stores in ``next_attempt_at``, so other replicas honour it too); a refusal only a person can
  fix holds it until the account's VERSION moves. While held, callers get the same error again
  without a database read or an Azure call.
* A hold recorded for one VERSION of an account never outlives that VERSION (``prune``).
* A ``min_ttl`` above what the cached token has may force a refresh at most once per
  ``forced_every`` seconds per account.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from service.errors import ActionRequired, Unavailable, UpstreamUnavailable


@dataclass(frozen=True)
class Hold:
    """Why this process does not ask Azure for an account now, and until when (inf: until a
    person changes the account, i.e. its VERSION moves)."""

    until: float
    version: int
    error: ActionRequired | Unavailable

    def raise_again(self, now: float) -> NoReturn:
        error = self.error
        if isinstance(error, ActionRequired):
            raise type(error)(error.detail, idp_code=error.idp_code, idp_message=error.idp_message)
        if isinstance(error, UpstreamUnavailable):
            raise UpstreamUnavailable(
                error.detail, retry_after=self.until - now, reason=error.reason, idp_code=error.idp_code
            )
        raise type(error)(error.detail, retry_after=self.until - now, reason=error.reason)


class HoldBook:
    def __init__(self, *, clock: Callable[[], float], forced_every: float) -> None:
        self._clock = clock
        self._forced_every = forced_every
        self._holds: dict[str, Hold] = {}
        self._forced: dict[str, float] = {}  # account id -> when a min_ttl last forced a refresh

    def hold(
        self, account_id: str, seconds: float, version: int, error: ActionRequired | Unavailable
    ) -> None:
        self._holds[account_id] = Hold(self._clock() + seconds, version, error)

    def held(self, account_id: str) -> Hold | None:
        hold = self._holds.get(account_id)
        return hold if hold is not None and self._clock() < hold.until else None

    def lift(self, account_id: str) -> None:
        self._holds.pop(account_id, None)

    def forced_recently(self, account_id: str) -> bool:
        return self._clock() - self._forced.get(account_id, -math.inf) < self._forced_every

    def note_forced(self, account_id: str) -> None:
        self._forced[account_id] = self._clock()

    def forget(self, account_id: str) -> None:
        self._holds.pop(account_id, None)
        self._forced.pop(account_id, None)

    def prune(self, versions: Mapping[str, int]) -> None:
        """Drop holds of accounts whose VERSION is not the one they were held for (changed or
        deleted elsewhere), and forced-refresh marks that no longer throttle anything."""
        for account_id, hold in list(self._holds.items()):
            if versions.get(account_id, -1) != hold.version:
                del self._holds[account_id]
        now = self._clock()
        for account_id, when in list(self._forced.items()):
            if now - when >= self._forced_every:
                del self._forced[account_id]  # keeps the map small

    def __len__(self) -> int:
        return len(self._holds)
