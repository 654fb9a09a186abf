"""A refresh failure written in the transaction that found it, and the hold it leaves once stored.

Invariants:
* A transient failure makes the account wait before Azure is asked again: a jittered wait that
  grows with its consecutive failures (at least Azure's ``Retry-After`` when throttled), stored
  as ``next_attempt_at`` so every replica honours it. A refusal only a person can fix is held
  until the account changes.
* This process holds the account only once the failure is committed (``stage`` returns the hold
  for the caller to apply then): a transaction that fails leaves no hold behind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.errors import ActionRequired, Unavailable
from service.kit import timeutil
from service.kit.backoff import exp_jitter
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import outcome
from service.tokens.holds import HoldBook


class Failures:
    def __init__(
        self, *, settings: Settings, holds: HoldBook, clock: Callable[[], float], rng: Callable[[], float]
    ) -> None:
        self._settings = settings
        self._holds = holds
        self._clock = clock
        self._rng = rng

    async def stage(
        self,
        session: AsyncSession,
        account: Account,
        state: AccountState,
        exc: ActionRequired | Unavailable,
        also: Mapping[str, Any] | None = None,
    ) -> Callable[[], None]:
        """Write ``exc`` into the account's rows (uncommitted); returns the hold to apply after
        the commit."""
        delay, retry_at, hold = 0.0, None, math.inf
        if isinstance(exc, Unavailable):
            delay = exp_jitter(
                state.failures + 1,
                base=self._settings.backoff_base_seconds,
                cap=self._settings.backoff_max_seconds,
                rng=self._rng,
                at_least=exc.retry_after if exc.reason == "throttled" else 0.0,
            )
            retry_at = timeutil.from_epoch(self._clock() + delay)
            hold = delay
        await outcome.record_failure(session, state, exc, retry_at=retry_at, retry_after=delay, also=also)
        account_id, version = account.id, account.version or 0
        return lambda: self._holds.hold(account_id, hold, version, exc)
