"""The token cache and the single-flight refresher. No FastAPI here.

Invariants:
* A token with less than ``min_token_ttl`` left is never handed out; a token with more than the
  (jittered) margin left is served from memory; in between it is served and one background
  refresh starts (stale-while-revalidate).
* One refresh per account at a time **per process**: the task is registered in ``_inflight``
  before any await, callers wait on it through ``asyncio.shield`` (a caller that goes away cannot
  cancel it), its result or error reaches every waiter, and it removes itself when done. Errors
  are never cached as tokens.
* Across replicas the database coordinates: a refresh locks the account's token row
  (``SELECT ... FOR UPDATE``), re-reads it, and calls Azure only if the stored token still needs
  refreshing. The rotated refresh token and the new access token are committed together before
  any caller sees the token; Azure is never called unless the row lock was taken (so the result
  can be stored).
* After a transient failure the account waits (``next_attempt_at``, stored so every replica
  honours it, and Azure's ``Retry-After`` when given) before Azure is asked again. This process
  also remembers it (``_holds``), as it remembers a refusal only a person can fix, so callers in
  the stale window do not each take the row lock to learn it again; a change of the account
  (its VERSION) lifts a hold.
* A result is stored only for what the account still holds: if an admin changed its credentials
  while Azure answered, the result is dropped (their values win).
* At most ``REFRESH_SLOTS`` refreshes hold a database connection at once, so a slow Azure cannot
  take the whole pool from readiness probes, the sync and the admin API; background refreshes
  take at most ``BACKGROUND_SLOTS`` of them, so callers with no usable token are not queued
  behind refreshes of tokens still being served.
* A caller waits at most ``max_wait_seconds`` in all; a ``min_ttl`` above what the cached token
  has forces at most one refresh per ``forced_refresh_interval_seconds`` per account.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.accounts.status import Status
from service.errors import (
    AccountNotFound,
    ActionRequired,
    InvalidCredentials,
    NeedsAuthorization,
    StorageUnavailable,
    Unavailable,
    UpstreamUnavailable,
)
from service.idp.azure_ad import AzureADClient, ClientCredentials, TokenGrant
from service.kit import sealing, timeutil
from service.kit.backoff import exp_jitter
from service.kit.crypto import Keyring
from service.kit.db import POOL_SIZE
from service.metrics import Metrics
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import outcome
from service.tokens import repository as repo
from service.tokens.response import CachedToken

log = logging.getLogger("service.broker")

# Refreshes that may hold a database connection at once: half the pool (service/db.py); of
# them, background refreshes (of tokens still being served) may take this many, so a caller
# with no usable token always finds a slot.
REFRESH_SLOTS = POOL_SIZE // 2
BACKGROUND_SLOTS = REFRESH_SLOTS - 2

# What Azure is asked with: the grant type, the credentials and the refresh token.
Asked = tuple[str, ClientCredentials, str]


@dataclass(frozen=True)
class _Hold:
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
    ) -> None:
        self._sessions = sessions
        self._azure = azure
        self._keyring = keyring
        self._secrets = secrets
        self._settings = settings
        self._metrics = metrics
        self.clock = clock
        self._rng = rng
        self.cache: dict[str, CachedToken] = {}
        self.default_account_id: str | None = None
        self._inflight: dict[str, asyncio.Task[CachedToken]] = {}
        self._holds: dict[str, _Hold] = {}
        self._forced: dict[str, float] = {}  # account id -> when a min_ttl last forced a refresh
        self._forced_every = settings.forced_refresh_interval_seconds
        self._slots = asyncio.Semaphore(REFRESH_SLOTS)
        self._refreshing = 0  # refreshes holding a slot
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._min_ttl = float(settings.min_token_ttl_seconds)

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

    async def exists(self, account_id: str) -> bool:
        async with self._session() as session:
            return await accounts_repo.get_account(session, account_id) is not None

    def need_for(self, min_ttl: float) -> float:
        return max(self._min_ttl, min_ttl)

    # -- the waiting path -----------------------------------------------------------------------

    async def resolve(self, account_id: str) -> str:
        if account_id != "default":
            return account_id
        async with self._session() as session:
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
            and account_id not in self._inflight  # a refresh on its way is worth waiting for
            and now - self._forced.get(account_id, -math.inf) < self._forced_every
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
            self._forced[account_id] = self.clock()  # only a refresh that succeeded counts
        return entry

    @staticmethod
    def too_slow() -> UpstreamUnavailable:
        return UpstreamUnavailable(
            "Getting a token took longer than the broker lets a caller wait; try again.",
            retry_after=2,
            reason="timeout",
        )

    async def _wait(self, account_id: str, need: float) -> CachedToken:
        task = self._inflight.get(account_id)
        if task is None:
            task = self._start(account_id, self._obtain(account_id, need))
        self._metrics.refresh_waiters.inc()
        try:
            return await asyncio.shield(task)
        finally:
            self._metrics.refresh_waiters.dec()

    def _start(self, account_id: str, work: Any) -> asyncio.Task[CachedToken]:
        # Registered before the coroutine first runs (no await in between): concurrent
        # callers in this process find it and wait on it instead of starting another.
        task: asyncio.Task[CachedToken] = asyncio.get_running_loop().create_task(work)
        self._inflight[account_id] = task
        self._metrics.refreshes_in_flight.inc()

        def _done(t: asyncio.Task[CachedToken]) -> None:
            if self._inflight.get(account_id) is t:
                del self._inflight[account_id]
            self._metrics.refreshes_in_flight.dec()
            if not t.cancelled():
                t.exception()  # retrieved here so an unawaited failure is not reported twice

        task.add_done_callback(_done)
        return task

    def refresh_in_background(self, account_id: str) -> None:
        if self._closed or account_id in self._inflight or self._held(account_id) is not None:
            return
        margin = float(self._settings.refresh_margin_seconds)
        self._start(account_id, self._obtain(account_id, margin, background=True))

    async def keepalive(self, account_id: str, *, refreshed_before: datetime) -> None:
        """Refresh an idle account so its refresh token does not expire from disuse."""
        if account_id in self._inflight:
            return
        task = self._start(account_id, self._refresh_in_slot(account_id, math.inf, None, refreshed_before))
        await asyncio.shield(task)

    async def _obtain(self, account_id: str, need: float, *, background: bool = False) -> CachedToken:
        hold = self._held(account_id)
        if hold is not None:
            hold.raise_again(self.clock())
        async with self._session() as session:
            row = await accounts_repo.get_account(session, account_id)
        if row is None:
            self.forget(account_id)
            raise AccountNotFound(account_id)
        entry = self._from_row(*row)
        if entry is not None and entry.expires_at - self.clock() >= need:
            self._store(entry)
            self._metrics.tokens["loaded"] += 1
            return entry
        seen = entry.obtained_at if entry is not None else None
        current = self.cache.get(account_id)
        if background and current is not None and self._refreshing >= BACKGROUND_SLOTS:
            # Callers without a usable token come first; the next stale hit tries again. No await
            # between this check and taking the slot below: the count cannot change meanwhile.
            return current
        return await self._refresh_in_slot(account_id, need, seen, None)

    async def _refresh_in_slot(
        self, account_id: str, need: float, seen: float | None, refreshed_before: datetime | None
    ) -> CachedToken:
        async with self._slots:
            self._refreshing += 1
            try:
                return await self._refresh_locked(account_id, need, seen, refreshed_before)
            finally:
                self._refreshing -= 1

    async def _refresh_locked(
        self, account_id: str, need: float, seen: float | None, refreshed_before: datetime | None
    ) -> CachedToken:
        """``seen``: when the stored token was obtained, as read before waiting for the lock."""
        async with self._session() as session:
            waited = time.perf_counter()
            row = await accounts_repo.lock_account_state(session, account_id)
            self._metrics.lock_wait.observe(time.perf_counter() - waited)
            if row is None:
                self.forget(account_id)
                raise AccountNotFound(account_id)
            account, state = row
            reuse = self._reusable(account, state, need, seen, refreshed_before)
            if reuse is not None:
                return reuse
            self._refuse_if_blocked(account, state)
            asked = self._asked_with(account, state)
            if self._settings.is_sqlite:
                # SQLite has one writer: holding its lock across the IdP call would stall every
                # other account. One process, single-flight per account: no lock is needed.
                await session.commit()
            grant = await self._call_azure(session, account, state, asked)
            try:
                entry = await self._save_grant(session, account, state, grant, asked)
                await session.commit()
            except SQLAlchemyError:
                entry = self._unsaved(account, grant)
        self._store(entry)
        self._holds.pop(account_id, None)
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
        return self._entry(
            account.id,
            grant.access_token,
            grant.expires_at,
            account.version or 0,
            account.api_url,
            self.clock(),
        )

    def _reusable(
        self,
        account: Account,
        state: AccountState,
        need: float,
        seen: float | None,
        refreshed_before: datetime | None,
    ) -> CachedToken | None:
        """The stored token when it makes a call to Azure unnecessary: it has ``need`` seconds
        left, or another replica refreshed while this one waited for the lock (Azure would answer
        a token of the same lifetime, whatever min_ttl asks)."""
        entry = self._from_row(account, state)
        if entry is None:
            return None
        left = entry.expires_at - self.clock()
        if refreshed_before is not None:
            fresh = state.last_refreshed_at is not None and state.last_refreshed_at >= refreshed_before
        else:
            fresh = left >= need or (left >= self._min_ttl and entry.obtained_at != seen)
        if fresh:
            self._store(entry)
            self._metrics.tokens["loaded"] += 1
            return entry
        return None

    def _refuse_if_blocked(self, account: Account, state: AccountState) -> None:
        """Raise (and remember) what the stored state says: a wait another replica started, or a
        refusal only a person can fix (asking Azure again with the same credentials cannot help)."""
        now = timeutil.utcnow()
        version = account.version or 0
        error: ActionRequired | Unavailable | None = None
        seconds = math.inf
        if state.next_attempt_at is not None and state.next_attempt_at > now:
            seconds = (state.next_attempt_at - now).total_seconds()
            error = UpstreamUnavailable(
                f"Azure AD failed recently ({state.last_error_code or 'error'}); the broker waits "
                "before asking again.",
                retry_after=seconds,
                reason="backoff",
            )
        elif state.status == Status.NEEDS_AUTHORIZATION and state.last_error_code:
            error = NeedsAuthorization(outcome.action_text(state), idp_code=state.last_error_code)
        elif state.status == Status.INVALID_CREDENTIALS and state.last_error_code:
            error = InvalidCredentials(outcome.action_text(state), idp_code=state.last_error_code)
        if error is not None:
            self._holds[account.id] = _Hold(self.clock() + seconds, version, error)
            raise error

    def _held(self, account_id: str) -> _Hold | None:
        hold = self._holds.get(account_id)
        return hold if hold is not None and self.clock() < hold.until else None

    def _asked_with(self, account: Account, state: AccountState) -> Asked:
        refresh_token = ""
        if state.grant_type == "authorization_code":
            refresh_token = self._secrets.refresh_token(account)
        return state.grant_type, self._secrets.credentials(account), refresh_token

    async def _still_current(
        self,
        session: AsyncSession,
        account: Account,
        state: AccountState,
        asked: Asked,
        grant: TokenGrant | None = None,
    ) -> tuple[Account, AccountState]:
        """The account's rows now, when Azure was asked with what the account still holds; else
        the result is dropped and the caller asked to try again (the admin's values win).

        On MySQL only another account's default change can move VERSION meanwhile (a PATCH waits
        for the token row lock); on SQLite, where Azure is called outside a transaction, any
        change can. The seed row stays locked until the result is committed."""
        row, changed = await self._lock_seed_row(session, account, state)
        if not changed or _grant_inputs(self._asked_with(*row)) == _grant_inputs(asked):
            return row  # unchanged, or only a name or the default flag: the result belongs here
        if grant is not None and grant.refresh_token:
            self._metrics.refresh_token_unsaved.inc()
        log.warning("refresh result dropped: the account changed", extra={"account_id": account.id})
        raise UpstreamUnavailable(
            "The account changed while Azure AD answered; try again.", retry_after=1, reason="conflict"
        )

    async def _lock_seed_row(
        self, session: AsyncSession, account: Account, state: AccountState
    ) -> tuple[tuple[Account, AccountState], bool]:
        """Lock the account's seed row (after its token row, the order every writer takes them);
        the rows as they are now, and whether VERSION moved since ``account`` was read."""
        if await accounts_repo.lock_account_version(session, account.id) == (account.version or 0):
            return (account, state), False
        row = await accounts_repo.get_account(session, account.id)
        if row is None:
            self.forget(account.id)
            raise AccountNotFound(account.id)
        return row, True

    async def _call_azure(
        self, session: AsyncSession, account: Account, state: AccountState, asked: Asked
    ) -> TokenGrant:
        grant_type, creds, refresh_token = asked
        if grant_type == "authorization_code" and not refresh_token:
            await self._record_failure(
                session,
                account,
                state,
                NeedsAuthorization(
                    "The account has no refresh token yet: authorize it "
                    f"(POST /accounts/{account.id}/authorize) or paste a code."
                ),
                asked,  # on SQLite an authorization may have landed since the read
            )
        started = time.perf_counter()
        result = "ok"
        try:
            if grant_type == "client_credentials":
                return await self._azure.client_credentials(creds)
            return await self._azure.refresh(creds, refresh_token)
        except (ActionRequired, UpstreamUnavailable) as exc:
            result = exc.code if isinstance(exc, ActionRequired) else exc.reason
            await self._record_failure(session, account, state, exc, asked)
        finally:
            self._metrics.idp_requests.labels(grant_type, result).inc()
            self._metrics.idp_latency.labels(grant_type).observe(time.perf_counter() - started)

    def _backoff(self, failures: int, retry_after: float) -> float:
        return exp_jitter(
            failures,
            base=self._settings.backoff_base_seconds,
            cap=self._settings.backoff_max_seconds,
            rng=self._rng,
            at_least=retry_after,
        )

    async def _record_failure(
        self,
        session: AsyncSession,
        account: Account,
        state: AccountState,
        exc: ActionRequired | Unavailable,
        asked: Asked | None = None,
    ) -> NoReturn:
        """Store what went wrong (committed even though the caller gets an error), then raise it
        and hold the account in this process: a transient failure for its backoff, a refusal
        until the account changes. ``asked``: Azure's answer to what, if the account may have
        changed since (then a failure for old credentials is not recorded)."""
        if asked is not None:
            account, state = await self._still_current(session, account, state, asked)
        delay, retry_at, hold = 0.0, None, math.inf
        if isinstance(exc, Unavailable):
            delay = self._backoff(state.failures + 1, exc.retry_after if exc.reason == "throttled" else 0.0)
            retry_at = timeutil.from_epoch(self.clock() + delay)
            hold = delay
        await outcome.record_failure(session, state, exc, retry_at=retry_at, retry_after=delay)
        self._holds[account.id] = _Hold(self.clock() + hold, account.version or 0, exc)
        raise exc

    async def _save_grant(
        self, session: AsyncSession, account: Account, state: AccountState, grant: TokenGrant, asked: Asked
    ) -> CachedToken:
        account, state = await self._still_current(session, account, state, asked, grant)
        now = self.clock()
        if grant.expires_at - now < self._settings.min_token_ttl_seconds:
            await self._record_failure(
                session,
                account,
                state,
                UpstreamUnavailable(
                    "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
                ),
            )
        version = await outcome.record_grant(session, self._keyring, account, state, grant)
        return self._entry(account.id, grant.access_token, grant.expires_at, version, account.api_url, now)

    async def store_authorization(
        self, account_id: str, grant: TokenGrant, *, actor: str | None
    ) -> CachedToken:
        """Store what a code exchange returned: the refresh token and the access token, together."""
        if not grant.refresh_token:
            raise UpstreamUnavailable(
                "Azure AD returned no refresh token: the app registration must allow offline_access.",
                reason="bad_response",
            )
        if grant.expires_at - self.clock() < self._settings.min_token_ttl_seconds:
            # Checked before anything is written: a failed authorization leaves the account as it was.
            raise UpstreamUnavailable(
                "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
            )
        async with self._session() as session, session.begin():
            row = await accounts_repo.lock_account_state(session, account_id)
            if row is None:
                raise AccountNotFound(account_id)
            (account, state), _ = await self._lock_seed_row(session, *row)
            # A new authorization supersedes any earlier failure or backoff.
            await accounts_repo.update_state(session, account_id, {"next_attempt_at": None, "failures": 0})
            version = await outcome.record_grant(session, self._keyring, account, state, grant)
            await accounts_repo.add_event(session, account_id=account_id, kind="authorized", actor=actor)
        entry = self._entry(
            account_id, grant.access_token, grant.expires_at, version, account.api_url, self.clock()
        )
        self._holds.pop(account_id, None)
        self._store(entry)
        return entry

    # -- helpers --------------------------------------------------------------------------------

    def _entry(
        self, account_id: str, token: str, expires_at: float, version: int, api_url: str, obtained: float
    ) -> CachedToken:
        margin = self._settings.refresh_margin_seconds * (1 - self._rng() / 5)
        return CachedToken(account_id, token, expires_at, expires_at - margin, version, api_url, obtained)

    def _from_row(self, account: Account, state: AccountState) -> CachedToken | None:
        if not state.access_token or state.token_expires_at is None:
            return None
        try:
            token = self._secrets.unseal(sealing.ACCESS_TOKEN, account.id, state.access_token)
        except StorageUnavailable:
            return None
        obtained = timeutil.to_epoch(state.last_refreshed_at) if state.last_refreshed_at else 0.0
        expires = timeutil.to_epoch(state.token_expires_at)
        return self._entry(account.id, token or "", expires, account.version or 0, account.api_url, obtained)

    def _store(self, entry: CachedToken) -> None:
        current = self.cache.get(entry.account_id)
        if current is None or current.expires_at <= entry.expires_at or current.version < entry.version:
            self.cache[entry.account_id] = entry
        self._metrics.cache_size.set(len(self.cache))

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        try:
            async with self._sessions() as session:
                yield session
        except DBAPIError as exc:
            if _is_lock_timeout(exc):
                raise UpstreamUnavailable(
                    "Another replica is still refreshing this account's token; try again.",
                    retry_after=1,
                    reason="lock_timeout",
                ) from None
            raise StorageUnavailable("The database cannot be reached.", reason="database") from None
        except SQLAlchemyError:
            raise StorageUnavailable("The database cannot be reached.", reason="database") from None

    async def preload(self) -> int:
        """Fill the cache with every stored token still worth serving, in one query.

        A restarted replica then answers its first request for each account from memory instead
        of one database read per account (seconds of cold start with thousands of accounts).
        """
        valid_after = timeutil.from_epoch(self.clock() + self._min_ttl)
        async with self._session() as session:
            rows = await repo.accounts_with_tokens(session, valid_after=valid_after)
        for account, state in rows:
            entry = self._from_row(account, state)
            if entry is not None:
                self._store(entry)
        return len(self.cache)

    # -- invalidation (admin changes, other replicas) -----------------------------------------

    def forget(self, account_id: str) -> None:
        self.cache.pop(account_id, None)
        self._holds.pop(account_id, None)
        self._forced.pop(account_id, None)
        self._metrics.cache_size.set(len(self.cache))

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
            self.forget(account_id)
        if default:
            self.default_account_id = account_id
        elif (default is False or deleted) and self.default_account_id == account_id:
            self.default_account_id = None

    def apply_versions(self, versions: list[tuple[str, int, bool]]) -> None:
        """Drop cached tokens and holds of accounts deleted or changed elsewhere; learn the default."""
        known = {account_id: version for account_id, version, _ in versions}
        for account_id, entry in list(self.cache.items()):
            if known.get(account_id, -1) != entry.version:
                self.forget(account_id)
        for account_id, hold in list(self._holds.items()):
            if known.get(account_id, -1) != hold.version:
                del self._holds[account_id]
        for account_id, when in list(self._forced.items()):
            if self.clock() - when >= self._forced_every:
                del self._forced[account_id]  # keeps the map small
        self.default_account_id = next((a for a, _, d in versions if d), None)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._inflight.values())
        if tasks:
            # A refresh that has reached Azure is allowed to finish and commit (its rotated
            # refresh token must be stored); the shutdown timeout bounds the wait.
            await asyncio.wait(tasks, timeout=self._settings.shutdown_timeout_seconds / 2)
            for task in tasks:
                task.cancel()


def _is_lock_timeout(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "args", [None])[0]
    return code in (1205, 3572) or "locked" in str(exc.orig).lower()


def _grant_inputs(asked: Asked) -> Asked:
    """What a refresh's result depends on: the authorize URL plays no part, so changing it does
    not void a result."""
    grant_type, creds, refresh_token = asked
    return grant_type, dataclasses.replace(creds, authorization_url=""), refresh_token
