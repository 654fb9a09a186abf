"""An authorization's result stored: what a code exchange returned, kept together.

Invariants: the refresh token and the access token are written in one transaction, under the
account's token and seed row locks (the order every writer takes them); a grant without a
refresh token, or with a token too short to hand out, writes nothing; a new authorization clears
any earlier failure, backoff and hold.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts import repository as accounts_repo
from service.errors import AccountNotFound, UpstreamUnavailable
from service.idp.azure_ad import TokenGrant
from service.kit.crypto import Keyring
from service.tokens import outcome, stored
from service.tokens.memory import AccountMemory
from service.tokens.response import CachedToken


async def store_authorization(
    open_session: Callable[[], AbstractAsyncContextManager[AsyncSession]],
    keyring: Keyring,
    memory: AccountMemory,
    account_id: str,
    grant: TokenGrant,
    *,
    actor: str | None,
    now: float,
    min_ttl: float,
) -> CachedToken:
    """Store what a code exchange returned: the refresh token and the access token, together."""
    if not grant.refresh_token:
        raise UpstreamUnavailable(
            "Azure AD returned no refresh token: the app registration must allow offline_access.",
            reason="bad_response",
        )
    if grant.expires_at - now < min_ttl:
        # Checked before anything is written: a failed authorization leaves the account as it was.
        raise UpstreamUnavailable(
            "Azure AD issued a token that expires too soon to hand out.", reason="short_lifetime"
        )
    async with open_session() as session, session.begin():
        row = await accounts_repo.lock_account_state(session, account_id)
        locked = await stored.lock_seed_row(session, *row) if row is not None else None
        if locked is None:
            memory.forget(account_id)
            raise AccountNotFound(account_id)
        account, state = locked
        # A new authorization supersedes any earlier failure or backoff.
        await accounts_repo.update_state(session, account_id, {"next_attempt_at": None, "failures": 0})
        version = await outcome.record_grant(session, keyring, account, state, grant)
        await accounts_repo.add_event(session, account_id=account_id, kind="authorized", actor=actor)
    entry = memory.tokens.entry(
        account_id, grant.access_token, grant.expires_at, version, account.api_url, now
    )
    memory.holds.lift(account_id)
    memory.tokens.store(entry)
    return entry
