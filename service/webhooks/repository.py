"""SQL of the webhook outbox: the lease (one deliverer at a time) and the event cursor."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.kit.timeutil import utcnow
from service.models import Event, Lease


async def newest_event_id(session: AsyncSession) -> int:
    """The highest event id, 0 with no events: where a reader starts that skips the backlog."""
    return int(await session.scalar(select(func.max(Event.id))) or 0)


async def events_after(session: AsyncSession, after_id: int, *, limit: int) -> list[Event]:
    """The next ``limit`` events after ``after_id``, oldest first (the outbox read in order)."""
    rows = await session.execute(select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit))
    return list(rows.scalars())


async def try_lease(session: AsyncSession, name: str, holder: str, *, ttl: timedelta) -> bool:
    """Take or renew a named lease; True when ``holder`` holds it afterwards."""
    now = utcnow()
    lease = (
        await session.execute(select(Lease).where(Lease.name == name).with_for_update())
    ).scalar_one_or_none()
    if lease is None:
        session.add(Lease(name=name, holder=holder, expires_at=now + ttl))
        try:
            await session.flush()
        except IntegrityError:
            return False
        return True
    if lease.holder != holder and lease.expires_at > now:
        return False
    lease.holder = holder
    lease.expires_at = now + ttl
    await session.flush()
    return True


async def get_lease(session: AsyncSession, name: str) -> Lease | None:
    """The named row of ``broker_leases`` (a lease, or a cursor kept in the same table), unlocked."""
    return await session.get(Lease, name)


async def add_lease(session: AsyncSession, name: str, holder: str, *, expires_at: datetime) -> None:
    """Stage a new row; a concurrent insert of the same name fails at the caller's commit."""
    session.add(Lease(name=name, holder=holder, expires_at=expires_at))


async def set_lease_holder(session: AsyncSession, name: str, holder: str) -> None:
    """Overwrite ``holder`` without a lease check: the caller renews the lease in this transaction."""
    await session.execute(update(Lease).where(Lease.name == name).values(holder=holder))


async def release_lease(session: AsyncSession, name: str, holder: str) -> None:
    """Expire the lease now if ``holder`` still holds it, so another replica need not wait it out."""
    await session.execute(
        update(Lease).where(Lease.name == name, Lease.holder == holder).values(expires_at=utcnow())
    )
