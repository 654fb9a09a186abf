"""The refresh transaction: one account's stored token renewed with Azure, coordinated by a claim.

Invariants:
* No database connection is held while Azure answers. A short transaction locks the account's
  token row, re-reads it, and claims the refresh (owner, claim id, expiry); a second short
  transaction stores the result. Azure is never called without a committed claim (so the result
  can be stored), and a caller gets a new token only after it was committed.
* One Azure call per account per expiry across replicas: a claim held by a live replica is
  waited for, with no connection and no refresh slot held (polled with backoff, at most
  ``lock_wait_seconds``), and the token it stores is used. A claim whose owner died (its named
  lock is free, claims.py) or that expired is taken over at once.
* The rotated refresh token and the new access token are stored together. A result is stored
  when nothing was stored since its claim read the row: a result arriving after its claim was
  taken over, but before the taker stored, is the newest and is stored (its rotated refresh token
  is not lost); once another result was stored, a later answer never overwrites it, and the
  stored token is served instead.
* If an admin changed the account's credentials while Azure answered, the result is dropped
  (their values win).
* After a transient failure the account waits (``next_attempt_at``, stored so every replica
  honours it, and Azure's ``Retry-After`` when given) before Azure is asked again; the hold book
  remembers it, and a refusal only a person can fix, so callers do not each read it again.
* At most ``max_concurrent_refreshes`` refreshes of this replica are at Azure at once (limiter.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.errors import (
    AccountNotFound,
    ActionRequired,
    NeedsAuthorization,
    StorageUnavailable,
    Unavailable,
    UpstreamUnavailable,
)
from service.idp.azure_ad import AzureADClient, TokenGrant
from service.kit import timeutil
from service.kit.backoff import exp_jitter
from service.kit.crypto import Keyring
from service.kit.db import open_session
from service.metrics import Metrics
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import outcome, stored
from service.tokens import repository as repo
from service.tokens.claims import CLEAR_CLAIM, Claim, ReplicaLiveness, Unread, Wait
from service.tokens.limiter import RefreshLimiter
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken
from service.tokens.stored import Asked

log = logging.getLogger("service.broker")

Answer = TokenGrant | ActionRequired | UpstreamUnavailable

LOCK_TIMEOUT = "Another replica is still refreshing this account's token; try again."


class Refresher:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        azure: AzureADClient,
        keyring: Keyring,
        secrets: AccountSecrets,
        settings: Settings,
        metrics: Metrics,
        memory: AccountMemory,
        limiter: RefreshLimiter,
        liveness: ReplicaLiveness,
        clock: Callable[[], float],
        rng: Callable[[], float],
    ) -> None:
        self.sessions = sessions
        self._azure = azure
        self._keyring = keyring
        self._secrets = secrets
        self._settings = settings
        self._metrics = metrics
        self._memory = memory
        self._tokens = memory.tokens
        self._holds = memory.holds
        self._limiter = limiter
        self._liveness = liveness
        self._clock = clock
        self._rng = rng
        self._min_ttl = float(settings.min_token_ttl_seconds)

    def open(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session whose database errors are the error tree's kinds (kit/db.py)."""
        return open_session(self.sessions, lock_timeout=LOCK_TIMEOUT)

    async def refresh(
        self, account_id: str, need: float, seen: float | Unread | None, refreshed_before: datetime | None
    ) -> CachedToken:
        """A token with ``need`` seconds left, from the database or from Azure.

        ``seen``: when the stored token was obtained, as read before (``UNREAD``: by the first
        claim transaction); ``refreshed_before``: a keepalive, satisfied by any refresh after that
        time."""
        wait = float(self._settings.lock_wait_seconds)
        deadline = time.monotonic() + wait
        pause = 0.02
        await self._liveness.ready(wait)
        while True:
            async with self._limiter.slot():
                got = await self._claim(account_id, need, seen, refreshed_before)
                if isinstance(got, Claim):
                    return await self._redeem(got)
            if not isinstance(got, Wait):
                return got
            seen = got.seen  # what the stored token was before the other replica's refresh
            # Another live replica is at Azure for this account: wait for what it stores, holding
            # neither a connection nor a slot.
            left = deadline - time.monotonic()
            if left <= 0:
                raise UpstreamUnavailable(LOCK_TIMEOUT, retry_after=1, reason="lock_timeout")
            await asyncio.sleep(min(left, pause * (0.5 + self._rng() / 2)))
            pause = min(pause * 2, 0.5)

    async def _claim(
        self, account_id: str, need: float, seen: float | Unread | None, refreshed_before: datetime | None
    ) -> CachedToken | Claim | Wait:
        """The first transaction: the stored token if it will do, else this replica's claim, else
        ``Wait`` while another live replica holds one."""
        async with self.open() as session:
            waited = time.perf_counter()
            row = await accounts_repo.lock_account_state(session, account_id)
            self._metrics.lock_wait.observe(time.perf_counter() - waited)
            if row is None:
                self._memory.forget(account_id)
                raise AccountNotFound(account_id)
            account, state = row
            entry = self._tokens.from_row(account, state)
            if isinstance(seen, Unread):
                seen = entry.obtained_at if entry is not None else None
            reuse = self._reusable(entry, state, need, seen, refreshed_before)
            if reuse is not None:
                return reuse
            self._refuse_if_blocked(account, state)
            now = timeutil.utcnow()
            expires = state.refresh_claim_expires_at
            if (
                expires is not None
                and expires > now
                and await self._liveness.owner_alive(session, state.refresh_claim_owner)
            ):
                return Wait(seen)
            asked = self._asked_with(account, state)
            if asked[0] == "authorization_code" and not asked[2]:
                await self._record_failure(
                    session,
                    account,
                    state,
                    NeedsAuthorization(
                        "The account has no refresh token yet: authorize it "
                        f"(POST /accounts/{account.id}/authorize) or paste a code."
                    ),
                )
            claim = Claim(account, asked, secrets.token_hex(8), state.last_refreshed_at)
            await repo.set_claim(
                session,
                account_id,
                owner=self._liveness.replica_id,
                claim_id=claim.claim_id,
                expires_at=now + timedelta(seconds=self._settings.lock_wait_seconds),
            )
            await session.commit()
            return claim

    async def _redeem(self, claim: Claim) -> CachedToken:
        """Ask Azure (no connection held), then store what it answered."""
        grant_type, creds, refresh_token = claim.asked
        started = time.perf_counter()
        result = "ok"
        answer: Answer
        try:
            if grant_type == "client_credentials":
                answer = await self._azure.client_credentials(creds)
            else:
                answer = await self._azure.refresh(creds, refresh_token)
        except (ActionRequired, UpstreamUnavailable) as exc:
            result = exc.code if isinstance(exc, ActionRequired) else exc.reason
            answer = exc
        finally:
            self._metrics.idp_requests.labels(grant_type, result).inc()
            self._metrics.idp_latency.labels(grant_type).observe(time.perf_counter() - started)
        try:
            entry = await self._store(claim, answer)
        except (StorageUnavailable, UpstreamUnavailable) as exc:
            if not isinstance(answer, TokenGrant) or exc.reason not in ("database", "lock_timeout"):
                raise
            entry = self._unsaved(claim.account, answer)
        self._tokens.store(entry)
        self._holds.lift(claim.account.id)
        self._metrics.tokens["refreshed"] += 1
        return entry

    async def _store(self, claim: Claim, answer: Answer) -> CachedToken:
        """The second transaction: Azure's answer (a grant, or a failure raised) stored under the
        claim, unless another result was stored since the claim read the row."""
        account_id = claim.account.id
        async with self.open() as session:
            row = await accounts_repo.lock_account_state(session, account_id)
            if row is None:
                self._memory.forget(account_id)
                raise AccountNotFound(account_id)
            locked = await stored.lock_seed_row(session, *row)
            if locked is None:
                self._memory.forget(account_id)
                raise AccountNotFound(account_id)
            account, state = locked
            # The claim is cleared in the same statement as the result when it is still ours (the
            # row is locked); a claim taken over stays with the replica that took it.
            release = CLEAR_CLAIM if state.refresh_claim_id == claim.claim_id else {}
            asked_now = self._asked_with(account, state)
            if stored.grant_inputs(asked_now) != stored.grant_inputs(claim.asked) or (
                state.last_refreshed_at != claim.refreshed_at
            ):
                if release:
                    await repo.clear_claim(session, account_id, claim.claim_id)
                entry = self._superseded(account, state, claim, asked_now, answer)
                await session.commit()
                return entry
            if not isinstance(answer, TokenGrant):
                await self._record_failure(session, account, state, answer, release)
            now = self._clock()
            if answer.expires_at - now < self._min_ttl:
                await self._record_failure(
                    session,
                    account,
                    state,
                    UpstreamUnavailable(
                        "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
                    ),
                    release,
                )
            version = await outcome.record_grant(session, self._keyring, account, state, answer, also=release)
            await session.commit()
            return self._tokens.entry(
                account.id, answer.access_token, answer.expires_at, version, account.api_url, now
            )

    def _superseded(
        self, account: Account, state: AccountState, claim: Claim, asked_now: Asked, answer: Answer
    ) -> CachedToken:
        """Another result was stored, or an admin changed the account, since the claim read it:
        this answer is dropped. The stored token is served when it was made with the same
        credentials (a replica that took the claim over stored it); else the caller tries again."""
        same_credentials = stored.grant_inputs(asked_now)[:2] == stored.grant_inputs(claim.asked)[:2]
        kept = self._tokens.from_row(account, state)
        if same_credentials and kept is not None and kept.expires_at - self._clock() >= self._min_ttl:
            log.info("refresh result superseded by a newer one", extra={"account_id": account.id})
            return kept
        if isinstance(answer, TokenGrant) and answer.refresh_token:
            self._metrics.refresh_token_unsaved.inc()
        log.warning("refresh result dropped: the account changed", extra={"account_id": account.id})
        raise UpstreamUnavailable(
            "The account changed while Azure AD answered; try again.", retry_after=1, reason="conflict"
        )

    def _unsaved(self, account: Account, grant: TokenGrant) -> CachedToken:
        """The database failed after Azure answered: the access token is valid, so it is served from
        memory; a rotated refresh token is lost here (Azure keeps the old one valid; a strictly
        single-use IdP will answer invalid_grant next time, and the account will say so)."""
        if grant.refresh_token:
            self._metrics.refresh_token_unsaved.inc()
        log.error(
            "refresh result could not be stored",
            extra={"account_id": account.id, "rotated": bool(grant.refresh_token)},
        )
        return self._tokens.entry(
            account.id,
            grant.access_token,
            grant.expires_at,
            account.version or 0,
            account.api_url,
            self._clock(),
        )

    def _reusable(
        self,
        entry: CachedToken | None,
        state: AccountState,
        need: float,
        seen: float | None,
        refreshed_before: datetime | None,
    ) -> CachedToken | None:
        """The stored token (``entry``) when it makes a call to Azure unnecessary: it has ``need`` seconds
        left, or another replica refreshed while this one waited for the lock (Azure would answer
        a token of the same lifetime, whatever min_ttl asks)."""
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

    def _refuse_if_blocked(self, account: Account, state: AccountState) -> None:
        """Raise (and remember) what the stored state says (stored.refusal)."""
        found = stored.refusal(state)
        if found is not None:
            error, seconds = found
            self._holds.hold(account.id, seconds, account.version or 0, error)
            raise error

    def _asked_with(self, account: Account, state: AccountState) -> Asked:
        refresh_token = ""
        if state.grant_type == "authorization_code":
            refresh_token = self._secrets.refresh_token(account)
        return state.grant_type, self._secrets.credentials(account), refresh_token

    async def _record_failure(
        self,
        session: AsyncSession,
        account: Account,
        state: AccountState,
        exc: ActionRequired | Unavailable,
        also: Mapping[str, Any] | None = None,
    ) -> NoReturn:
        """Store what went wrong (committed even though the caller gets an error), then raise it
        and hold the account in this process: a transient failure for its backoff, a refusal
        until the account changes."""
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
        self._holds.hold(account.id, hold, account.version or 0, exc)
        raise exc
