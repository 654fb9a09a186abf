"""The refresh transaction: one account's stored token renewed with Azure, under the row lock.

Invariants:
* Across replicas the database coordinates: a refresh locks the account's token row
  (``SELECT ... FOR UPDATE``), re-reads it, and calls Azure only if the stored token still needs
  refreshing. Azure is never called unless the row lock was taken (so the result can be stored).
* The rotated refresh token and the new access token are committed together before any caller
  sees the token.
* After a transient failure the account waits (``next_attempt_at``, stored so every replica
  honours it, and Azure's ``Retry-After`` when given) before Azure is asked again; the hold book
  remembers it, and a refusal only a person can fix, so callers do not each take the lock to
  learn it again.
* A result is stored only for what the account still holds: if an admin changed its credentials
  while Azure answered, the result is dropped (their values win).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import NoReturn

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.accounts.status import Status
from service.errors import (
    AccountNotFound,
    ActionRequired,
    InvalidCredentials,
    NeedsAuthorization,
    Unavailable,
    UpstreamUnavailable,
)
from service.idp.azure_ad import AzureADClient, ClientCredentials, TokenGrant
from service.kit import timeutil
from service.kit.backoff import exp_jitter
from service.kit.crypto import Keyring
from service.kit.db import open_session
from service.metrics import Metrics
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import outcome
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken

log = logging.getLogger("service.broker")

# What Azure is asked with: the grant type, the credentials and the refresh token.
Asked = tuple[str, ClientCredentials, str]

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
        self._clock = clock
        self._rng = rng
        self._min_ttl = float(settings.min_token_ttl_seconds)

    def open(self) -> AbstractAsyncContextManager[AsyncSession]:
        """A session whose database errors are the error tree's kinds (kit/db.py)."""
        return open_session(self.sessions, lock_timeout=LOCK_TIMEOUT)

    async def refresh(
        self, account_id: str, need: float, seen: float | None, refreshed_before: datetime | None
    ) -> CachedToken:
        """A token with ``need`` seconds left, from the database or from Azure, under the row lock.

        ``seen``: when the stored token was obtained, as read before waiting for the lock;
        ``refreshed_before``: a keepalive, satisfied by any refresh after that time."""
        async with self.open() as session:
            waited = time.perf_counter()
            row = await accounts_repo.lock_account_state(session, account_id)
            self._metrics.lock_wait.observe(time.perf_counter() - waited)
            if row is None:
                self._memory.forget(account_id)
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
        self._tokens.store(entry)
        self._holds.lift(account_id)
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
        entry = self._tokens.from_row(account, state)
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
        """Raise (and remember) what the stored state says: a wait another replica started, or a
        refusal only a person can fix (asking Azure again with the same credentials cannot help)."""
        now = timeutil.utcnow()
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
            self._holds.hold(account.id, seconds, account.version or 0, error)
            raise error

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
        row, changed = await self.lock_seed_row(session, account, state)
        if not changed or _grant_inputs(self._asked_with(*row)) == _grant_inputs(asked):
            return row  # unchanged, or only a name or the default flag: the result belongs here
        if grant is not None and grant.refresh_token:
            self._metrics.refresh_token_unsaved.inc()
        log.warning("refresh result dropped: the account changed", extra={"account_id": account.id})
        raise UpstreamUnavailable(
            "The account changed while Azure AD answered; try again.", retry_after=1, reason="conflict"
        )

    async def lock_seed_row(
        self, session: AsyncSession, account: Account, state: AccountState
    ) -> tuple[tuple[Account, AccountState], bool]:
        """Lock the account's seed row (after its token row, the order every writer takes them);
        the rows as they are now, and whether VERSION moved since ``account`` was read."""
        if await accounts_repo.lock_account_version(session, account.id) == (account.version or 0):
            return (account, state), False
        row = await accounts_repo.get_account(session, account.id)
        if row is None:
            self._memory.forget(account.id)
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
            delay = exp_jitter(
                state.failures + 1,
                base=self._settings.backoff_base_seconds,
                cap=self._settings.backoff_max_seconds,
                rng=self._rng,
                at_least=exc.retry_after if exc.reason == "throttled" else 0.0,
            )
            retry_at = timeutil.from_epoch(self._clock() + delay)
            hold = delay
        await outcome.record_failure(session, state, exc, retry_at=retry_at, retry_after=delay)
        self._holds.hold(account.id, hold, account.version or 0, exc)
        raise exc

    async def _save_grant(
        self, session: AsyncSession, account: Account, state: AccountState, grant: TokenGrant, asked: Asked
    ) -> CachedToken:
        account, state = await self._still_current(session, account, state, asked, grant)
        now = self._clock()
        if grant.expires_at - now < self._min_ttl:
            await self._record_failure(
                session,
                account,
                state,
                UpstreamUnavailable(
                    "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
                ),
            )
        version = await outcome.record_grant(session, self._keyring, account, state, grant)
        return self._tokens.entry(
            account.id, grant.access_token, grant.expires_at, version, account.api_url, now
        )

    async def store_authorization(
        self, account_id: str, grant: TokenGrant, *, actor: str | None
    ) -> CachedToken:
        """Store what a code exchange returned: the refresh token and the access token, together."""
        if not grant.refresh_token:
            raise UpstreamUnavailable(
                "Azure AD returned no refresh token: the app registration must allow offline_access.",
                reason="bad_response",
            )
        if grant.expires_at - self._clock() < self._min_ttl:
            # Checked before anything is written: a failed authorization leaves the account as it was.
            raise UpstreamUnavailable(
                "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
            )
        async with self.open() as session, session.begin():
            row = await accounts_repo.lock_account_state(session, account_id)
            if row is None:
                raise AccountNotFound(account_id)
            (account, state), _ = await self.lock_seed_row(session, *row)
            # A new authorization supersedes any earlier failure or backoff.
            await accounts_repo.update_state(session, account_id, {"next_attempt_at": None, "failures": 0})
            version = await outcome.record_grant(session, self._keyring, account, state, grant)
            await accounts_repo.add_event(session, account_id=account_id, kind="authorized", actor=actor)
        entry = self._tokens.entry(
            account_id, grant.access_token, grant.expires_at, version, account.api_url, self._clock()
        )
        self._holds.lift(account_id)
        self._tokens.store(entry)
        return entry


def _grant_inputs(asked: Asked) -> Asked:
    """What a refresh's result depends on: the authorize URL plays no part, so changing it does
    not void a result."""
    grant_type, creds, refresh_token = asked
    return grant_type, dataclasses.replace(creds, authorization_url=""), refresh_token
