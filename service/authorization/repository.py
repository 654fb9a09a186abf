"""SQL of pending authorizations: a state is taken (deleted) exactly once."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.kit.timeutil import utcnow
from service.models import PendingAuthorization


async def add_pending(session: AsyncSession, pending: PendingAuthorization) -> None:
    await session.execute(delete(PendingAuthorization).where(PendingAuthorization.expires_at < utcnow()))
    session.add(pending)
    await session.flush()


async def take_pending(
    session: AsyncSession, state_hash: str, *, account_id: str | None = None
) -> PendingAuthorization | None:
    """Consume a pending authorization: exactly one caller gets it, even across replicas.

    With ``account_id``, only a row for that account is consumed; any other is left as it was."""
    query = select(PendingAuthorization).where(PendingAuthorization.state_hash == state_hash)
    if account_id is not None:
        query = query.where(PendingAuthorization.account_id == account_id)
    pending = (await session.execute(query.with_for_update())).scalar_one_or_none()
    # MySQL's utf8 collation matches 'ABC' to 'abc': only the exact account id counts.
    if pending is None or (account_id is not None and pending.account_id != account_id):
        return None
    result = await session.execute(
        delete(PendingAuthorization).where(PendingAuthorization.state_hash == state_hash)
    )
    return pending if getattr(result, "rowcount", 0) == 1 else None
