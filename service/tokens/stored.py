"""What an account's stored rows say about a refresh, read under the token row's lock.

Invariants: every writer locks an account's token row before its seed row (``lock_seed_row``
keeps that order); a refresh's result depends only on the grant type, the credentials and the
refresh token it was asked with (``grant_inputs``), never on the name, the default flag or the
authorize URL; a stored wait or refusal is honoured before Azure is asked (``refusal``).
"""

from __future__ import annotations

import dataclasses
import math

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts import repository as accounts_repo
from service.accounts.credentials import AccountSecrets
from service.accounts.status import Status
from service.errors import (
    ActionRequired,
    InvalidCredentials,
    NeedsAuthorization,
    Unavailable,
    UpstreamUnavailable,
)
from service.idp.azure_ad import ClientCredentials
from service.kit import timeutil
from service.models import Account, AccountState
from service.tokens import outcome

# What Azure is asked with: the grant type, the credentials and the refresh token.
Asked = tuple[str, ClientCredentials, str]


def refusal(state: AccountState) -> tuple[ActionRequired | Unavailable, float] | None:
    """What the stored state refuses, and for how long (inf: until the account changes): a wait
    another replica started, or a refusal only a person can fix (asking Azure again with the same
    credentials cannot help)."""
    now = timeutil.utcnow()
    if state.next_attempt_at is not None and state.next_attempt_at > now:
        seconds = (state.next_attempt_at - now).total_seconds()
        error = UpstreamUnavailable(
            f"Azure AD failed recently ({state.last_error_code or 'error'}); the broker waits "
            "before asking again.",
            retry_after=seconds,
            reason="backoff",
        )
        return error, seconds
    if state.status == Status.NEEDS_AUTHORIZATION and state.last_error_code:
        return NeedsAuthorization(outcome.action_text(state), idp_code=state.last_error_code), math.inf
    if state.status == Status.INVALID_CREDENTIALS and state.last_error_code:
        return InvalidCredentials(outcome.action_text(state), idp_code=state.last_error_code), math.inf
    return None


async def lock_seed_row(
    session: AsyncSession, account: Account, state: AccountState
) -> tuple[Account, AccountState] | None:
    """Lock the account's seed row (after its token row, the order every writer takes them) and
    return the rows as they are now (re-read if VERSION moved since ``account`` was read); None
    when the account was deleted."""
    if await accounts_repo.lock_account_version(session, account.id) == (account.version or 0):
        return account, state
    return await accounts_repo.get_account(session, account.id)


def asked_with(secrets: AccountSecrets, account: Account, state: AccountState) -> Asked:
    """What Azure would be asked with now (the secrets unsealed from the rows)."""
    refresh_token = ""
    if state.grant_type == "authorization_code":
        refresh_token = secrets.refresh_token(account)
    return state.grant_type, secrets.credentials(account), refresh_token


def grant_inputs(asked: Asked) -> Asked:
    """What a refresh's result depends on: the authorize URL plays no part, so changing it does
    not void a result."""
    grant_type, creds, refresh_token = asked
    return grant_type, dataclasses.replace(creds, authorization_url=""), refresh_token
