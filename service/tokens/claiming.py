"""The first refresh transaction, for a batch of accounts: each stored token re-read under its
row's lock, then used, refused, waited for, or claimed for this replica.

Invariants:
* One transaction per batch: the token rows are locked in one statement (in key order), the
  claims are written in one statement, one commit stores them with any failure found. A wave of
  cold accounts costs a few statements per batch, not per account.
* A batch never waits on a lock (``SKIP LOCKED``): an account whose row another transaction
  holds is claimed alone, waiting for its lock as a single refresh would (steps.py). So a batch
  cannot deadlock, and one busy account holds no other up.
* Per account the decision is the single refresh's: the stored token when it will do (``need``
  seconds left, or another replica refreshed since ``seen``); else a stored wait or refusal;
  else ``Wait`` while a live replica's unexpired claim stands; else this replica's claim (or,
  with no refresh token yet, a failure that is stored).
* Holds follow only what was committed (failures.py); the caller has taken this replica's named
  lock before any claim (claims.py).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.errors import (
    AccountNotFound,
    BrokerError,
    NeedsAuthorization,
)
from service.kit import timeutil
from service.metrics import Metrics
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import repository as repo
from service.tokens import stored
from service.tokens.claims import Claim, ReplicaLiveness, Unread, Wait
from service.tokens.failures import Failures
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken
from service.tokens.steps import SKIPPED, BatchStep, Skipped

log = logging.getLogger("service.broker")


@dataclass(frozen=True)
class Ask:
    """One account's refresh as asked: ``need`` seconds left; ``seen``: when the stored token was
    obtained, as read before (``UNREAD``: read here); ``refreshed_before``: a keepalive, satisfied
    by any refresh after that time."""

    account_id: str
    need: float
    seen: float | Unread | None
    refreshed_before: datetime | None


Claimed = CachedToken | Claim | Wait


class ClaimStep(BatchStep[Ask, Claimed]):
    kind = "claim"

    def __init__(
        self,
        *,
        open_session: Callable[[], AbstractAsyncContextManager[AsyncSession]],
        memory: AccountMemory,
        secrets: AccountSecrets,
        settings: Settings,
        metrics: Metrics,
        liveness: ReplicaLiveness,
        failures: Failures,
        clock: Callable[[], float],
    ) -> None:
        self._open = open_session
        self._memory = memory
        self._tokens = memory.tokens
        self._secrets = secrets
        self._settings = settings
        self._metrics = metrics
        self._liveness = liveness
        self._failures = failures
        self._clock = clock
        self._min_ttl = float(settings.min_token_ttl_seconds)

    async def _run(self, asks: list[Ask], *, skip_locked: bool) -> list[Claimed | Skipped | BaseException]:
        results: list[Claimed | Skipped | BaseException] = [SKIPPED] * len(asks)
        after: list[Callable[[], None]] = []
        async with self._open() as session:
            waited = time.perf_counter()
            rows = await accounts_repo.lock_account_states_many(
                session, [a.account_id for a in asks], skip_locked=skip_locked
            )
            self._metrics.lock_wait.observe(time.perf_counter() - waited)
            claim_id = secrets.token_hex(8)
            now = timeutil.utcnow()
            alive: dict[str, bool] = {}
            decided: set[str] = set()
            claimed: list[str] = []
            for i, ask in enumerate(asks):
                row = rows.get(ask.account_id)
                if row is None or ask.account_id in decided:
                    if not skip_locked:  # its lock was waited for: the account is gone
                        self._memory.forget(ask.account_id)
                        results[i] = AccountNotFound(ask.account_id)
                    continue
                decided.add(ask.account_id)
                try:
                    results[i] = await self._decide(session, ask, *row, claim_id, now, alive, after)
                except BrokerError as exc:
                    results[i] = exc
                if isinstance(results[i], Claim):
                    claimed.append(ask.account_id)
            if claimed:
                await repo.set_claims(
                    session,
                    claimed,
                    owner=self._liveness.replica_id,
                    claim_id=claim_id,
                    expires_at=now + timedelta(seconds=self._settings.lock_wait_seconds),
                )
            await session.commit()
        for apply in after:
            apply()
        return results

    async def _decide(
        self,
        session: AsyncSession,
        ask: Ask,
        account: Account,
        state: AccountState,
        claim_id: str,
        now: datetime,
        alive: dict[str, bool],
        after: list[Callable[[], None]],
    ) -> Claimed | BaseException:
        entry = self._tokens.from_row(account, state)
        seen = ask.seen
        if isinstance(seen, Unread):
            seen = entry.obtained_at if entry is not None else None
        reuse = self._reusable(entry, state, ask.need, seen, ask.refreshed_before)
        if reuse is not None:
            return reuse
        found = stored.refusal(state)
        if found is not None:
            error, seconds = found
            self._memory.holds.hold(account.id, seconds, account.version or 0, error)
            return error
        owner = state.refresh_claim_owner
        expires = state.refresh_claim_expires_at
        if expires is not None and expires > now and owner is not None:
            if owner not in alive:
                alive[owner] = await self._liveness.owner_alive(session, owner)
            if alive[owner]:
                return Wait(seen)
        asked = stored.asked_with(self._secrets, account, state)
        if asked[0] == "authorization_code" and not asked[2]:
            error = NeedsAuthorization(
                "The account has no refresh token yet: authorize it "
                f"(POST /accounts/{account.id}/authorize) or paste a code."
            )
            after.append(await self._failures.stage(session, account, state, error))
            return error
        return Claim(account, asked, claim_id, state.last_refreshed_at)

    def _reusable(
        self,
        entry: CachedToken | None,
        state: AccountState,
        need: float,
        seen: float | None,
        refreshed_before: datetime | None,
    ) -> CachedToken | None:
        """The stored token (``entry``) when it makes a call to Azure unnecessary: it has ``need``
        seconds left, or another replica refreshed since ``seen`` (Azure would answer a token of
        the same lifetime, whatever min_ttl asks)."""
        if entry is None:
            return None
        left = entry.expires_at - self._clock()
        if refreshed_before is not None:
            fresh = state.last_refreshed_at is not None and state.last_refreshed_at >= refreshed_before
        else:
            fresh = left >= need or (left >= self._min_ttl and entry.obtained_at != seen)
        if fresh:
            self._tokens.store(entry)
            self._metrics.tokens["loaded"] += 1
            return entry
        return None
