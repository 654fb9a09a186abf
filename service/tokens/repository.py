"""SQL of the tokens feature: reading stored tokens in bulk."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

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
