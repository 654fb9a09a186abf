"""The token broker: what the token endpoint, the sync and the accounts feature talk to. No FastAPI.

A thin facade over parts that each keep one invariant: the token cache (``cache.py``), the hold
book (``holds.py``), both owned by ``memory.py``; the single-flight (``kit/singleflight.py``); the
refresh limiter (``limiter.py``); the refresh (``refresh.py``), its batched claim and store
transactions (``claiming.py``, ``storing.py``, over ``kit/batching.py``) and the claim's owner
(``claims.py``).

Invariants kept here:
* A token with less than ``min_token_ttl`` left is never handed out; a token with more than the
  (jittered) margin left is served from memory; in between it is served and one background
  refresh starts (stale-while-revalidate).
* One refresh per account at a time in this process (the single-flight); errors are never
  cached as tokens.
* A caller waits at most ``max_wait_seconds`` in all; a ``min_ttl`` above what the cached token
  has forces at most one refresh per ``forced_refresh_interval_seconds`` per account.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.errors import AccountNotFound, UpstreamUnavailable
from service.idp.azure_ad import AzureADClient, TokenGrant
from service.kit import timeutil
from service.kit.crypto import Keyring
from service.kit.singleflight import SingleFlight
from service.metrics import Metrics
from service.settings import Settings
from service.tokens import authorized
from service.tokens import repository as repo
from service.tokens.cache import TokenCache
from service.tokens.claims import UNREAD, ReplicaLiveness
from service.tokens.holds import HoldBook
from service.tokens.limiter import RefreshLimiter
from service.tokens.memory import AccountMemory
from service.tokens.refresh import Refresher
from service.tokens.response import CachedToken


class TokenBroker:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        azure: AzureADClient,
        keyring: Keyring,
        secrets: AccountSecrets,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        cache: TokenCache | None = None,
        replica_id: str | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._keyring = keyring
        self.clock = clock
        # Every part reads the broker's clock through this, so one replacement moves them all.
        now = self.now
        self.cache = cache or TokenCache(
            margin=settings.refresh_margin_seconds, rng=rng, secrets=secrets, metrics=metrics
        )
        self.holds = HoldBook(clock=now, forced_every=settings.forced_refresh_interval_seconds)
        self.memory = AccountMemory(self.cache, self.holds)
        self.limiter = RefreshLimiter.for_slots(settings.max_concurrent_refreshes)
        bind = sessions.kw.get("bind")
        self.liveness = ReplicaLiveness(
            bind if isinstance(bind, AsyncEngine) else None, replica_id=replica_id
        )
        self._flights: SingleFlight[str, CachedToken] = SingleFlight(
            on_start=metrics.refreshes_in_flight.inc, on_done=metrics.refreshes_in_flight.dec
        )
        self._refresher = Refresher(
            sessions=sessions,
            azure=azure,
            keyring=keyring,
            secrets=secrets,
            settings=settings,
            metrics=metrics,
            memory=self.memory,
            limiter=self.limiter,
            liveness=self.liveness,
            clock=now,
            rng=rng,
        )
        self.default_account_id: str | None = None
        self._closed = False
        self._min_ttl = float(settings.min_token_ttl_seconds)

    @property
    def refreshes_in_flight(self) -> int:
        """Refreshes (and database reads standing in for one) running in this process now."""
        return len(self._flights)

    # -- the hot path ---------------------------------------------------------------------------

    def peek(self, account_id: str, need: float) -> CachedToken | None:
        """A cached token with at least ``need`` seconds left, or None. No I/O, no awaits."""
        entry = self.cache.get(account_id)
        if entry is None:
            return None
        now = self.clock()
        if entry.expires_at - now < need:
            return None
        if now >= entry.refresh_at:
            self._metrics.tokens["stale_served"] += 1
            self.refresh_in_background(account_id)
        else:
            self._metrics.tokens["hit"] += 1
        return entry

    def now(self) -> float:
        return self.clock()

    def need_for(self, min_ttl: float) -> float:
        return max(self._min_ttl, min_ttl)

    async def exists(self, account_id: str) -> bool:
        async with self._refresher.open() as session:
            return await accounts_repo.get_account(session, account_id) is not None

    # -- the waiting path -----------------------------------------------------------------------

    async def resolve(self, account_id: str) -> str:
        if account_id != "default":
            return account_id
        async with self._refresher.open() as session:
            found = await accounts_repo.default_account_id(session)
        if found is None:
            raise AccountNotFound("default")
        return found

    async def get_token(self, account_id: str, *, min_ttl: float = 0) -> CachedToken:
        """A token with at least max(min_token_ttl, min_ttl) left, refreshing if needed."""
        need = self.need_for(min_ttl)
        entry = self.peek(account_id, need)
        if entry is not None:
            return entry
        now = self.clock()
        cached = self.cache.get(account_id)
        forced = cached is not None and cached.expires_at - now >= self._min_ttl  # by min_ttl alone
        if (
            cached is not None
            and forced
            and account_id not in self._flights  # a refresh on its way is worth waiting for
            and self.holds.forced_recently(account_id)
        ):
            self._metrics.tokens["hit"] += 1
            return cached
        try:
            async with asyncio.timeout(self._settings.max_wait_seconds):
                entry = await self._wait(account_id, need)
                # A refresh that finished for a caller needing less may not satisfy this one;
                # one more round asks Azure. A token fetched after we arrived is returned as it
                # is, even when Azure's lifetime is shorter than min_ttl (asking again would not
                # help).
                if entry.expires_at - self.clock() < need and entry.obtained_at < now:
                    entry = await self._wait(account_id, need)
        except TimeoutError:
            raise self.too_slow() from None
        if forced:
            self.holds.note_forced(account_id)  # only a refresh that succeeded counts
        return entry

    @staticmethod
    def too_slow() -> UpstreamUnavailable:
        return UpstreamUnavailable(
            "Getting a token took longer than the broker lets a caller wait; try again.",
            retry_after=2,
            reason="timeout",
        )

    async def _wait(self, account_id: str, need: float) -> CachedToken:
        self._metrics.refresh_waiters.inc()
        try:
            return await self._flights.run(account_id, lambda: self._obtain(account_id, need))
        finally:
            self._metrics.refresh_waiters.dec()

    def refresh_in_background(self, account_id: str) -> None:
        if self._closed or account_id in self._flights or self.holds.held(account_id) is not None:
            return
        margin = float(self._settings.refresh_margin_seconds)
        self._flights.start(account_id, lambda: self._obtain(account_id, margin, background=True))

    async def keepalive(self, account_id: str, *, refreshed_before: datetime) -> None:
        """Refresh an idle account so its refresh token does not expire from disuse."""
        if account_id in self._flights:
            return
        await self._flights.run(
            account_id, lambda: self._refresher.refresh(account_id, math.inf, None, refreshed_before)
        )

    async def _obtain(self, account_id: str, need: float, *, background: bool = False) -> CachedToken:
        hold = self.holds.held(account_id)
        if hold is not None:
            hold.raise_again(self.clock())
        if not background:
            # The claim transaction reads the stored token first and uses it when it will do.
            return await self._refresher.refresh(account_id, need, UNREAD, None)
        async with self._refresher.open() as session:
            row = await accounts_repo.get_account(session, account_id)
        if row is None:
            self.memory.forget(account_id)
            raise AccountNotFound(account_id)
        entry = self.cache.from_row(*row)
        if entry is not None and entry.expires_at - self.clock() >= need:
            self.cache.store(entry)
            self._metrics.tokens["loaded"] += 1
            return entry
        seen = entry.obtained_at if entry is not None else None
        current = self.cache.get(account_id)
        if current is not None and self.limiter.background_full():
            # Callers without a usable token come first; the next stale hit tries again. No await
            # between this check and taking the slot: the count cannot change meanwhile.
            return current
        return await self._refresher.refresh(account_id, need, seen, None)

    async def store_authorization(
        self, account_id: str, grant: TokenGrant, *, actor: str | None
    ) -> CachedToken:
        """Store what a code exchange returned: the refresh token and the access token, together."""
        return await authorized.store_authorization(
            self._refresher.open,
            self._keyring,
            self.memory,
            account_id,
            grant,
            actor=actor,
            now=self.clock(),
            min_ttl=self._min_ttl,
        )

    async def preload(self) -> int:
        """Fill the cache with every stored token still worth serving, in one query.

        A restarted replica then answers its first request for each account from memory instead
        of one database read per account (seconds of cold start with thousands of accounts).
        """
        valid_after = timeutil.from_epoch(self.clock() + self._min_ttl)
        async with self._refresher.open() as session:
            rows = await repo.accounts_with_tokens(session, valid_after=valid_after)
        for account, state in rows:
            entry = self.cache.from_row(account, state)
            if entry is not None:
                self.cache.store(entry)
        return len(self.cache)

    # -- invalidation (admin changes, other replicas) -----------------------------------------

    def forget(self, account_id: str) -> None:
        self.memory.forget(account_id)

    def account_changed(
        self,
        account_id: str,
        *,
        credentials: bool = False,
        deleted: bool = False,
        default: bool | None = None,
    ) -> None:
        """What the accounts feature tells the broker after it committed a change: a deleted account
        or new credentials void the cached token and holds; ``default`` moves the default here
        (True) or away from here (False)."""
        if deleted or credentials:
            self.memory.forget(account_id)
        if default:
            self.default_account_id = account_id
        elif (default is False or deleted) and self.default_account_id == account_id:
            self.default_account_id = None

    def apply_versions(self, versions: list[tuple[str, int, bool]]) -> None:
        """Drop cached tokens and holds of accounts deleted or changed elsewhere; learn the default."""
        self.memory.apply_versions({account_id: version for account_id, version, _ in versions})
        self.default_account_id = next((a for a, _, d in versions if d), None)

    async def close(self) -> None:
        self._closed = True
        # A refresh that has reached Azure is allowed to finish and commit (its rotated refresh
        # token must be stored); the shutdown timeout bounds the wait.
        await self._flights.close(grace=self._settings.shutdown_timeout_seconds / 2)
        await self._refresher.close()
        await self.liveness.close()
