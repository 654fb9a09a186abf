"""SQL of the tokens feature: reading stored tokens in bulk, the refresh claim, and the MySQL named
lock each replica holds while it lives (its claims are taken over once the lock is free)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.models import Account, AccountState


async def accounts_with_tokens(
    session: AsyncSession, *, valid_after: datetime
) -> list[tuple[Account, AccountState]]:
    """Every account whose stored access token is still valid at ``valid_after``."""
    rows = await session.execute(
        select(Account, AccountState)
        .join(AccountState, AccountState.account_id == Account.id)
        .where(AccountState.access_token.is_not(None), AccountState.token_expires_at > valid_after)
    )
    return [(a, s) for a, s in rows]


async def set_claims(
    session: AsyncSession, account_ids: Sequence[str], *, owner: str, claim_id: str, expires_at: datetime
) -> None:
    """Write this replica's claim on each account's refresh, in one statement (the caller holds
    the rows' locks). One claim id serves a whole batch: it tells claims on one account apart."""
    await session.execute(
        update(AccountState)
        .where(AccountState.account_id.in_(sorted(account_ids)))
        .values(refresh_claim_owner=owner, refresh_claim_id=claim_id, refresh_claim_expires_at=expires_at)
        .execution_options(synchronize_session=False)
    )


async def clear_claim(session: AsyncSession, account_id: str, claim_id: str) -> None:
    """Remove the claim ``claim_id`` if it is still the account's (a taken-over claim stays)."""
    await session.execute(
        update(AccountState)
        .where(AccountState.account_id == account_id, AccountState.refresh_claim_id == claim_id)
        .values(refresh_claim_owner=None, refresh_claim_id=None, refresh_claim_expires_at=None)
        .execution_options(synchronize_session=False)
    )


async def named_lock_in_use(session: AsyncSession, name: str) -> bool:
    """MySQL: whether any connection holds the named lock ``name`` (``IS_USED_LOCK``)."""
    held = (await session.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": name})).scalar()
    return held is not None


async def take_named_lock(connection: AsyncConnection, name: str) -> bool:
    """MySQL: take the named lock ``name`` on this connection without waiting; True when held."""
    got = (await connection.execute(text("SELECT GET_LOCK(:name, 0)"), {"name": name})).scalar()
    return bool(got)


async def holds_named_lock(connection: AsyncConnection, name: str) -> bool:
    """MySQL: whether this very connection still holds ``name`` (a ping that also checks the lock)."""
    owner = (
        await connection.execute(text("SELECT IS_USED_LOCK(:name) = CONNECTION_ID()"), {"name": name})
    ).scalar()
    return bool(owner)
