"""A refresh: one account's stored token renewed with Azure, coordinated by a claim.

Invariants:
* No database connection is held while Azure answers. A short transaction claims the refresh
  (claiming.py: the token row locked and re-read, owner, claim id and expiry written); Azure is
  asked with no connection held; a second short transaction stores the result (storing.py).
  Azure is never called without a committed claim (so the result can be stored), and a caller
  gets a new token only after it was committed.
* Both transactions are batched (kit/batching.py): the accounts that ask while one batch runs
  are claimed, or stored, together in the next, so the database work per refresh falls as the
  wave grows, and a lone refresh waits for no timer.
* One Azure call per account per expiry across replicas: a claim held by a live replica is
  waited for, with no connection and no refresh slot held (polled with backoff, at most
  ``lock_wait_seconds``), and the token it stores is used. A claim whose owner died (its named
  lock is free, claims.py) or that expired is taken over at once.
* At most ``max_concurrent_refreshes`` refreshes of this replica are claiming or at Azure at
  once (limiter.py); storing the answer takes no slot.
* If the database fails after Azure answered, the access token is served from memory (it is
  valid), and the loss of a rotated refresh token is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts.credentials import AccountSecrets
from service.errors import ActionRequired, StorageUnavailable, UpstreamUnavailable
from service.idp.azure_ad import AzureADClient, TokenGrant
from service.kit.batching import Batcher
from service.kit.crypto import Keyring
from service.kit.db import open_session
from service.metrics import Metrics
from service.models import Account
from service.settings import Settings
from service.tokens.claiming import Ask, Claimed, ClaimStep
from service.tokens.claims import Claim, ReplicaLiveness, Unread, Wait
from service.tokens.failures import Failures
from service.tokens.limiter import RefreshLimiter
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken
from service.tokens.steps import Skipped
from service.tokens.storing import Answer, Landing, StoreStep

log = logging.getLogger("service.broker")

LOCK_TIMEOUT = "Another replica is still refreshing this account's token; try again."

# A batch locks at most this many rows; at most BATCHES claim batches and BATCHES store batches
# run at once, each on one pooled connection (kit/db.py sizes the pool for them).
BATCH_SIZE = 100
BATCHES = 3


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
        self._settings = settings
        self._metrics = metrics
        self._tokens = memory.tokens
        self._holds = memory.holds
        self._limiter = limiter
        self._liveness = liveness
        self._clock = clock
        self._rng = rng
        failures = Failures(settings=settings, holds=memory.holds, clock=clock, rng=rng)
        self.claim_step = ClaimStep(
            open_session=self.open,
            memory=memory,
            secrets=secrets,
            settings=settings,
            metrics=metrics,
            liveness=liveness,
            failures=failures,
            clock=clock,
        )
        self.store_step = StoreStep(
            open_session=self.open,
            memory=memory,
            keyring=keyring,
            secrets=secrets,
            settings=settings,
            metrics=metrics,
            failures=failures,
            clock=clock,
        )
        self.claims: Batcher[Ask, Claimed | Skipped] = Batcher(
            self.claim_step, max_size=BATCH_SIZE, concurrency=BATCHES
        )
        self.stores: Batcher[Landing, CachedToken | Skipped] = Batcher(
            self.store_step, max_size=BATCH_SIZE, concurrency=BATCHES
        )

    async def close(self) -> None:
        """Let the batches under way end (a store batch holds Azure's answers)."""
        await self.claims.drain()
        await self.stores.drain()

    def open(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session whose database errors are the error tree's kinds (kit/db.py)."""
        return open_session(self.sessions, lock_timeout=LOCK_TIMEOUT)

    async def refresh(
        self, account_id: str, need: float, seen: float | Unread | None, refreshed_before: datetime | None
    ) -> CachedToken:
        """A token with ``need`` seconds left, from the database or from Azure.

        ``seen``: when the stored token was obtained, as read before (``UNREAD``: by the claim
        transaction); ``refreshed_before``: a keepalive, satisfied by any refresh after that
        time."""
        wait = float(self._settings.lock_wait_seconds)
        deadline = time.monotonic() + wait
        pause = 0.02
        await self._liveness.ready(wait)
        while True:
            async with self._limiter.slot():
                got = await self._claim(Ask(account_id, need, seen, refreshed_before))
                if isinstance(got, Claim):
                    answer = await self._ask_azure(got)
            if isinstance(got, Claim):
                return await self._keep(got, answer)
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

    async def _claim(self, ask: Ask) -> Claimed:
        got = await self.claims.submit(ask)
        return await self.claim_step.alone(ask) if isinstance(got, Skipped) else got

    async def _ask_azure(self, claim: Claim) -> Answer:
        """Azure's answer to the claim's grant (a failure as a value), with no connection held."""
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
        return answer

    async def _keep(self, claim: Claim, answer: Answer) -> CachedToken:
        """Store Azure's answer (a failure is stored, then raised) and cache the token."""
        landing = Landing(claim, answer)
        try:
            got = await self.stores.submit(landing)
            entry = await self.store_step.alone(landing) if isinstance(got, Skipped) else got
        except (StorageUnavailable, UpstreamUnavailable) as exc:
            if not isinstance(answer, TokenGrant) or exc.reason not in ("database", "lock_timeout"):
                raise
            entry = self._unsaved(claim.account, answer)
        self._tokens.store(entry)
        self._holds.lift(claim.account.id)
        self._metrics.tokens["refreshed"] += 1
        return entry

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
