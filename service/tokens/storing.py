"""The second refresh transaction, for a batch of Azure's answers: each stored under its claim,
unless another result or an admin's change came first.

Invariants:
* One transaction per batch: the token rows, then the seed rows, are locked in one statement
  each (key order, the order every writer takes them), each account's result is written, and
  one commit stores them all. The rotated refresh token and its access token are written in the
  same transaction, and a caller gets the token only after it committed.
* A batch never waits on a lock (``SKIP LOCKED``): an answer whose rows another transaction
  holds is stored alone, waiting for the lock; a batch the database fails is stored one answer
  at a time before any is given up (steps.py).
* Per account, as for a single store: a result is stored when nothing was stored since its claim
  read the row. A result arriving after its claim was taken over, but before the taker stored,
  is the newest and is stored (its rotated refresh token is not lost); once another result was
  stored, a later answer never overwrites it, and the stored token is served instead. If an
  admin changed the credentials meanwhile, the result is dropped (their values win). The claim
  is cleared with the result while it is still this one; a claim taken over stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.errors import (
    AccountNotFound,
    ActionRequired,
    BrokerError,
    UpstreamUnavailable,
)
from service.idp.azure_ad import TokenGrant
from service.kit.crypto import Keyring
from service.metrics import Metrics
from service.models import Account, AccountState
from service.settings import Settings
from service.tokens import outcome, stored
from service.tokens import repository as repo
from service.tokens.claims import CLEAR_CLAIM, Claim
from service.tokens.failures import Failures
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken
from service.tokens.steps import SKIPPED, BatchStep, Skipped
from service.tokens.stored import Asked

log = logging.getLogger("service.broker")

Answer = TokenGrant | ActionRequired | UpstreamUnavailable


@dataclass(frozen=True)
class Landing:
    """Azure's answer to one claim, on its way to the database."""

    claim: Claim
    answer: Answer


class StoreStep(BatchStep[Landing, CachedToken]):
    kind = "store"

    def __init__(
        self,
        *,
        open_session: Callable[[], AbstractAsyncContextManager[AsyncSession]],
        memory: AccountMemory,
        keyring: Keyring,
        secrets: AccountSecrets,
        settings: Settings,
        metrics: Metrics,
        failures: Failures,
        clock: Callable[[], float],
    ) -> None:
        self._open = open_session
        self._memory = memory
        self._tokens = memory.tokens
        self._keyring = keyring
        self._secrets = secrets
        self._metrics = metrics
        self._failures = failures
        self._clock = clock
        self._min_ttl = float(settings.min_token_ttl_seconds)

    async def _run(
        self, landings: list[Landing], *, skip_locked: bool
    ) -> list[CachedToken | Skipped | BaseException]:
        results: list[CachedToken | Skipped | BaseException] = [SKIPPED] * len(landings)
        after: list[Callable[[], None]] = []
        async with self._open() as session:
            ids = [landing.claim.account.id for landing in landings]
            rows = await accounts_repo.lock_account_states_many(session, ids, skip_locked=skip_locked)
            versions = await accounts_repo.lock_account_versions(session, list(rows), skip_locked=skip_locked)
            decided: set[str] = set()
            for i, landing in enumerate(landings):
                account_id = landing.claim.account.id
                row = rows.get(account_id)
                if row is not None and account_id in versions and account_id not in decided:
                    decided.add(account_id)
                    if versions[account_id] != (row[0].version or 0):
                        row = await accounts_repo.get_account(session, account_id)  # changed since read
                elif skip_locked:
                    continue
                else:
                    row = None
                if row is None:  # deleted
                    self._memory.forget(account_id)
                    results[i] = AccountNotFound(account_id)
                    continue
                try:
                    results[i] = await self._decide(session, landing, *row, after)
                except BrokerError as exc:
                    results[i] = exc
            await session.commit()
        for apply in after:
            apply()
        return results

    async def _decide(
        self,
        session: AsyncSession,
        landing: Landing,
        account: Account,
        state: AccountState,
        after: list[Callable[[], None]],
    ) -> CachedToken | BaseException:
        claim, answer = landing.claim, landing.answer
        release = CLEAR_CLAIM if state.refresh_claim_id == claim.claim_id else {}
        asked_now = stored.asked_with(self._secrets, account, state)
        if stored.grant_inputs(asked_now) != stored.grant_inputs(claim.asked) or (
            state.last_refreshed_at != claim.refreshed_at
        ):
            if release:
                await repo.clear_claim(session, account.id, claim.claim_id)
            return self._superseded(account, state, claim, asked_now, answer)
        if not isinstance(answer, TokenGrant):
            after.append(await self._failures.stage(session, account, state, answer, release))
            return answer
        now = self._clock()
        if answer.expires_at - now < self._min_ttl:
            error = UpstreamUnavailable(
                "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
            )
            after.append(await self._failures.stage(session, account, state, error, release))
            return error
        version = await outcome.record_grant(session, self._keyring, account, state, answer, also=release)
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
