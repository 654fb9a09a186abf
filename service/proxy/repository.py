"""SQL of the proxy: the account pauses shared by the replicas (``broker_proxy_pause``).

Invariant: a row's ``until`` only moves forward; datetimes are naive UTC. An account's row goes
with the account (foreign key, ON DELETE CASCADE).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import ProxyPause


async def extend_pause(session: AsyncSession, account_id: str, until: datetime) -> None:
    """Set the account's pause to ``until`` unless a later one is stored (not committed here)."""
    moved = await session.execute(
        update(ProxyPause)
        .where(ProxyPause.account_id == account_id, ProxyPause.until < until)
        .values(until=until)
    )
    if getattr(moved, "rowcount", 0):
        return
    exists = await session.scalar(select(ProxyPause.account_id).where(ProxyPause.account_id == account_id))
    if exists is not None:
        return  # a later pause is stored already
    try:
        async with session.begin_nested():
            await session.execute(insert(ProxyPause).values(account_id=account_id, until=until))
    except IntegrityError:
        # Another replica inserted meanwhile, or the account is gone: keep the later of the two.
        await session.execute(
            update(ProxyPause)
            .where(ProxyPause.account_id == account_id, ProxyPause.until < until)
            .values(until=until)
        )


async def active_pauses(session: AsyncSession, now: datetime) -> Sequence[tuple[str, datetime]]:
    rows = await session.execute(
        select(ProxyPause.account_id, ProxyPause.until).where(ProxyPause.until > now)
    )
    return [(account_id, until) for account_id, until in rows.all()]
