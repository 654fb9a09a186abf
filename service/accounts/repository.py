"""SQL of the accounts feature: the seed table, the account's state row and its events.

Invariants kept here: at most one default account (changes serialise on a mutex row);
``VERSION`` grows by one on every write to an account row; a name collision surfaces as
``NameConflict`` whatever the database's wording; datetimes are naive UTC. Every writer locks an
account's state row before its seed row.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts.status import Status
from service.errors import NameConflict
from service.kit.timeutil import storable_id, utcnow
from service.models import Account, AccountCredential, AccountState, Event, Lease

DEFAULT_MUTEX = "mutex:default_account"


def _is_name_conflict(exc: IntegrityError) -> bool:
    text = str(exc.orig).lower()
    return "name" in text and ("duplicate" in text or "unique" in text)


async def flush_or_conflict(session: AsyncSession) -> None:
    try:
        await session.flush()
    except IntegrityError as exc:
        if _is_name_conflict(exc):
            raise NameConflict("An account with this name already exists.") from None
        raise


async def lock_default_mutex(session: AsyncSession) -> None:
    await session.execute(select(Lease.name).where(Lease.name == DEFAULT_MUTEX).with_for_update())


async def clear_default(session: AsyncSession, *, except_id: str) -> list[str]:
    """Unset the default flag everywhere but ``except_id``; returns the ids that lost it."""
    rows = await session.execute(
        select(Account.id).where(Account.default_account.is_(True), Account.id != except_id)
    )
    ids = list(rows.scalars())
    if ids:
        await session.execute(
            update(Account)
            .where(Account.id.in_(ids))
            .values(default_account=False, version=func.coalesce(Account.version, 0) + 1)
        )
    return ids


async def insert_account(
    session: AsyncSession, account: Account, state: AccountState, credential: AccountCredential | None = None
) -> None:
    session.add(account)
    await flush_or_conflict(session)
    session.add(state)
    if credential is not None:
        session.add(credential)
    await session.flush()


async def save_credential(session: AsyncSession, account_id: str, values: Mapping[str, Any]) -> None:
    """Write the account's credentials row, creating it for an account written by someone else."""
    values = {**values, "updated_at": utcnow()}
    result = await session.execute(
        update(AccountCredential)
        .where(AccountCredential.account_id == account_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if not getattr(result, "rowcount", 0):
        defaults: dict[str, Any] = {"credential_type": "client_secret", "previous_secret_in_use": False}
        session.add(AccountCredential(account_id=account_id, **(defaults | values)))
        await session.flush()


async def get_account(session: AsyncSession, account_id: str) -> tuple[Account, AccountState] | None:
    if not storable_id(account_id):
        return None
    row = (
        await session.execute(
            select(Account, AccountState)
            .join(AccountState, AccountState.account_id == Account.id)
            .where(Account.id == account_id)
            .execution_options(populate_existing=True)
        )
    ).first()
    # MySQL's utf8 collation matches 'ABC' and 'abc ' to 'abc': only the exact id counts.
    return (row[0], row[1]) if row and row[0].id == account_id else None


async def default_account_id(session: AsyncSession) -> str | None:
    rows = await session.execute(
        select(Account.id).where(Account.default_account.is_(True)).order_by(Account.id).limit(1)
    )
    return rows.scalar_one_or_none()


async def account_name(session: AsyncSession, account_id: str) -> str | None:
    """The account's NAME, for a notification about it; None once the account is deleted."""
    row = (await session.execute(select(Account.id, Account.name).where(Account.id == account_id))).first()
    return row[1] if row is not None and row[0] == account_id else None  # exact id, as get_account


async def list_accounts(
    session: AsyncSession, *, limit: int, offset: int, credential_expires_before: datetime | None = None
) -> list[tuple[Account, AccountState]]:
    stmt = select(Account, AccountState).join(AccountState, AccountState.account_id == Account.id)
    if credential_expires_before is not None:
        stmt = stmt.join(AccountCredential, AccountCredential.account_id == Account.id).where(
            AccountCredential.credential_expires_at < credential_expires_before
        )
    rows = await session.execute(stmt.order_by(Account.name, Account.id).limit(limit).offset(offset))
    return [(a, s) for a, s in rows]


async def account_versions(session: AsyncSession) -> list[tuple[str, int, bool]]:
    """(id, version, default) of every account: what replicas compare to drop stale caches."""
    rows = await session.execute(select(Account.id, Account.version, Account.default_account))
    return [(i, v or 0, bool(d)) for i, v, d in rows]


async def update_account_columns(
    session: AsyncSession, account_id: str, values: Mapping[str, Any], *, expected_version: int | None
) -> bool:
    """Write only the changed columns and bump VERSION; False when the version did not match."""
    stmt = (
        update(Account)
        .where(Account.id == account_id)
        .values(**values, version=func.coalesce(Account.version, 0) + 1)
    )
    if expected_version is not None:
        stmt = stmt.where(func.coalesce(Account.version, 0) == expected_version)
    try:
        result = await session.execute(stmt.execution_options(synchronize_session=False))
    except IntegrityError as exc:
        if _is_name_conflict(exc):
            raise NameConflict("An account with this name already exists.") from None
        raise
    return bool(getattr(result, "rowcount", 0))


async def update_state(session: AsyncSession, account_id: str, values: Mapping[str, Any]) -> None:
    await session.execute(
        update(AccountState)
        .where(AccountState.account_id == account_id)
        .values(**values, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


async def delete_account(session: AsyncSession, account_id: str) -> bool:
    result = await session.execute(delete(Account).where(Account.id == account_id))
    return bool(getattr(result, "rowcount", 0))


async def lock_account_state(session: AsyncSession, account_id: str) -> tuple[Account, AccountState] | None:
    """Lock the account's token row (waits at most the lock timeout), then read both rows fresh."""
    return (await lock_account_states_many(session, [account_id], skip_locked=False)).get(account_id)


async def lock_account_states_many(
    session: AsyncSession, account_ids: Sequence[str], *, skip_locked: bool
) -> dict[str, tuple[Account, AccountState]]:
    """Lock the token rows of ``account_ids`` in one statement, then read their accounts fresh.

    Rows are locked in key order, whoever asks, so two such batches never deadlock. With
    ``skip_locked`` a row another transaction holds is left out at once instead of waited for
    (so is a deleted account: the caller cannot tell them apart and asks for that one alone)."""
    wanted = {i for i in account_ids if storable_id(i)}
    if not wanted:
        return {}
    states = (
        await session.execute(
            select(AccountState)
            .where(AccountState.account_id.in_(sorted(wanted)))
            .with_for_update(skip_locked=skip_locked)
            .execution_options(populate_existing=True)
        )
    ).scalars()
    locked = {s.account_id: s for s in states if s.account_id in wanted}  # exact ids only
    if not locked:
        return {}
    accounts = (
        (
            await session.execute(
                select(Account)
                .where(Account.id.in_(sorted(locked)))
                .execution_options(populate_existing=True)
            )
        )
        .unique()
        .scalars()
    )
    return {a.id: (a, locked[a.id]) for a in accounts if a.id in locked}


async def lock_account_versions(
    session: AsyncSession, account_ids: Sequence[str], *, skip_locked: bool
) -> dict[str, int]:
    """Lock the seed rows of ``account_ids`` (after their token rows) and return each VERSION;
    with ``skip_locked`` a row another transaction holds is left out, as a deleted one is."""
    wanted = set(account_ids)
    if not wanted:
        return {}
    rows = await session.execute(
        select(Account.id, Account.version)
        .where(Account.id.in_(sorted(wanted)))
        .with_for_update(skip_locked=skip_locked)
    )
    return {i: v or 0 for i, v in rows if i in wanted}


async def lock_account_version(session: AsyncSession, account_id: str) -> int | None:
    """Lock the account's seed row and return its VERSION (None: deleted)."""
    return (await lock_account_versions(session, [account_id], skip_locked=False)).get(account_id)


async def credential_expiries(session: AsyncSession) -> list[tuple[str, str, datetime, str | None]]:
    """(id, credential type, expires at, last expiry notice) of every account with an expiry date."""
    rows = await session.execute(
        select(
            AccountCredential.account_id,
            AccountCredential.credential_type,
            AccountCredential.credential_expires_at,
            AccountCredential.expiry_notified,
        ).where(AccountCredential.credential_expires_at.is_not(None))
    )
    return [(i, k, e, n) for i, k, e, n in rows if e is not None]


async def claim_expiry_stage(
    session: AsyncSession, account_id: str, *, expires_at: datetime, was: str | None, stage: str
) -> bool:
    """Record ``stage`` as notified if the expiry date and the last notice are still what the scan
    read (``was``): one replica wins, and a credential replaced meanwhile is left alone."""
    last = AccountCredential.expiry_notified
    result = await session.execute(
        update(AccountCredential)
        .where(
            AccountCredential.account_id == account_id,
            last.is_(None) if was is None else last == was,
            AccountCredential.credential_expires_at == expires_at,
        )
        .values(expiry_notified=stage)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))


async def accounts_failed_with(session: AsyncSession, code: str) -> list[str]:
    """Accounts whose last refusal has this code and which still say so (invalid_credentials)."""
    rows = await session.execute(
        select(AccountState.account_id).where(
            AccountState.last_error_code == code, AccountState.status == Status.INVALID_CREDENTIALS
        )
    )
    return list(rows.scalars())


async def status_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(AccountState.status, func.count()).group_by(AccountState.status))
    return {str(status): int(count) for status, count in rows}


async def stale_authorization_code_accounts(session: AsyncSession, *, older_than: datetime) -> list[str]:
    rows = await session.execute(
        select(AccountState.account_id).where(
            AccountState.grant_type == "authorization_code",
            AccountState.status.in_((Status.READY, Status.FAILING)),
            (AccountState.last_refreshed_at.is_(None)) | (AccountState.last_refreshed_at < older_than),
        )
    )
    return list(rows.scalars())


async def add_event(
    session: AsyncSession,
    *,
    account_id: str | None,
    kind: str,
    actor: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> None:
    session.add(
        Event(
            account_id=account_id,
            kind=kind,
            actor=actor,
            detail=json.dumps(detail, sort_keys=True) if detail else None,
            created_at=utcnow(),
        )
    )


async def list_events(session: AsyncSession, account_id: str, *, limit: int, offset: int) -> list[Event]:
    rows = await session.execute(
        select(Event)
        .where(Event.account_id == account_id)
        .order_by(Event.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows.scalars())


async def latest_event_detail(
    session: AsyncSession, account_id: str, kind: str, *, before_id: int, since: datetime
) -> str | None:
    """DETAIL of the account's newest ``kind`` event before ``before_id`` and not older than ``since``."""
    rows = await session.scalars(
        select(Event.detail)
        .where(
            Event.account_id == account_id,
            Event.kind == kind,
            Event.id < before_id,
            Event.created_at >= since,
        )
        .order_by(Event.id.desc())
        .limit(1)
    )
    return rows.first()


async def existing_account_ids(session: AsyncSession, account_ids: Sequence[str]) -> set[str]:
    candidates = [a for a in account_ids if storable_id(a)]
    if not candidates:
        return set()
    rows = await session.execute(select(Account.id).where(Account.id.in_(candidates)))
    return set(rows.scalars()) & set(candidates)  # exact matches only (case-insensitive collation)
