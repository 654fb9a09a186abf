"""The only module that issues SQL. Async functions taking the session first.

Invariants kept here: at most one default account (changes serialise on a mutex row);
``VERSION`` grows by one on every write to an account row; a name collision surfaces as
``NameConflict`` whatever the database's wording; datetimes are naive UTC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import NameConflict
from .models import Account, AccountState, ApiKey, ApiKeyScope, Event, Lease, PendingAuthorization

DEFAULT_MUTEX = "mutex:default_account"


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def to_epoch(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


def from_epoch(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def storable_id(value: str) -> bool:
    """Whether an id could be stored at all: a longer one, or one with 4-byte characters that
    MySQL's utf8 columns reject (an error, not a miss), names no row."""
    return 0 < len(value) <= 255 and all(ord(ch) <= 0xFFFF for ch in value)


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


async def insert_account(session: AsyncSession, account: Account, state: AccountState) -> None:
    session.add(account)
    await flush_or_conflict(session)
    session.add(state)
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
    session: AsyncSession, *, limit: int, offset: int
) -> list[tuple[Account, AccountState]]:
    rows = await session.execute(
        select(Account, AccountState)
        .join(AccountState, AccountState.account_id == Account.id)
        .order_by(Account.name, Account.id)
        .limit(limit)
        .offset(offset)
    )
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
    if not storable_id(account_id):
        return None
    state = (
        await session.execute(
            select(AccountState)
            .where(AccountState.account_id == account_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    if state is None:
        return None
    account = (
        await session.execute(
            select(Account).where(Account.id == account_id).execution_options(populate_existing=True)
        )
    ).scalar_one_or_none()
    return (account, state) if account is not None and account.id == account_id else None


async def lock_account_version(session: AsyncSession, account_id: str) -> int | None:
    """Lock the account's seed row and return its VERSION (None: deleted)."""
    row = (
        await session.execute(
            select(Account.id, Account.version).where(Account.id == account_id).with_for_update()
        )
    ).first()
    return (row[1] or 0) if row is not None and row[0] == account_id else None


async def status_counts(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(AccountState.status, func.count()).group_by(AccountState.status))
    return {str(status): int(count) for status, count in rows}


async def stale_authorization_code_accounts(session: AsyncSession, *, older_than: datetime) -> list[str]:
    rows = await session.execute(
        select(AccountState.account_id).where(
            AccountState.grant_type == "authorization_code",
            AccountState.status.in_(("ready", "failing")),
            (AccountState.last_refreshed_at.is_(None)) | (AccountState.last_refreshed_at < older_than),
        )
    )
    return list(rows.scalars())


# -- events ---------------------------------------------------------------------------------


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


async def newest_event_id(session: AsyncSession) -> int:
    """The highest event id, 0 with no events: where a reader starts that skips the backlog."""
    return int(await session.scalar(select(func.max(Event.id))) or 0)


async def events_after(session: AsyncSession, after_id: int, *, limit: int) -> list[Event]:
    """The next ``limit`` events after ``after_id``, oldest first (the outbox read in order)."""
    rows = await session.execute(select(Event).where(Event.id > after_id).order_by(Event.id).limit(limit))
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


# -- pending authorizations -------------------------------------------------------------------


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


# -- caller keys ------------------------------------------------------------------------------


async def insert_key(session: AsyncSession, key: ApiKey) -> None:
    """Add a key row and flush, so its scope rows can refer to it in the same transaction."""
    session.add(key)
    await session.flush()


async def list_keys(session: AsyncSession, *, limit: int, offset: int) -> list[ApiKey]:
    rows = await session.execute(
        select(ApiKey).order_by(ApiKey.created_at, ApiKey.id).limit(limit).offset(offset)
    )
    return list(rows.scalars())


async def get_key(session: AsyncSession, key_id: str) -> ApiKey | None:
    if not storable_id(key_id):
        return None
    key = await session.get(ApiKey, key_id)
    return key if key is not None and key.id == key_id else None


async def key_scopes(session: AsyncSession, key_ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    stmt = select(ApiKeyScope.key_id, ApiKeyScope.account_id).order_by(ApiKeyScope.account_id)
    if key_ids is not None:
        stmt = stmt.where(ApiKeyScope.key_id.in_(key_ids))
    scopes: dict[str, list[str]] = {}
    for key_id, account_id in await session.execute(stmt):
        scopes.setdefault(key_id, []).append(account_id)
    return scopes


async def set_key_scope(session: AsyncSession, key_id: str, account_ids: Sequence[str]) -> None:
    await session.execute(delete(ApiKeyScope).where(ApiKeyScope.key_id == key_id))
    for account_id in dict.fromkeys(account_ids):
        session.add(ApiKeyScope(key_id=key_id, account_id=account_id))
    await session.flush()


async def existing_account_ids(session: AsyncSession, account_ids: Sequence[str]) -> set[str]:
    candidates = [a for a in account_ids if storable_id(a)]
    if not candidates:
        return set()
    rows = await session.execute(select(Account.id).where(Account.id.in_(candidates)))
    return set(rows.scalars()) & set(candidates)  # exact matches only (case-insensitive collation)


async def all_keys(session: AsyncSession) -> list[ApiKey]:
    return list((await session.execute(select(ApiKey))).scalars())


async def delete_key(session: AsyncSession, key_id: str) -> bool:
    result = await session.execute(delete(ApiKey).where(ApiKey.id == key_id))
    return bool(getattr(result, "rowcount", 0))


async def touch_keys(session: AsyncSession, used: Mapping[str, datetime]) -> None:
    for key_id, when in used.items():
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(last_used_at=when)
            .execution_options(synchronize_session=False)
        )


# -- leases -----------------------------------------------------------------------------------


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


# -- key rotation -----------------------------------------------------------------------------


async def account_ids_after(session: AsyncSession, after_id: str, *, limit: int) -> list[str]:
    """The next ``limit`` account ids after ``after_id``, in id order: one rotation batch."""
    rows = await session.execute(
        select(Account.id).where(Account.id > after_id).order_by(Account.id).limit(limit)
    )
    return list(rows.scalars())


async def lock_account_states(session: AsyncSession, account_ids: Sequence[str]) -> None:
    """Lock these accounts' token rows; taken before their seed rows, as a refresh does."""
    await session.execute(
        select(AccountState.account_id).where(AccountState.account_id.in_(account_ids)).with_for_update()
    )


async def account_secrets(
    session: AsyncSession, account_ids: list[str]
) -> list[tuple[str, str | None, str, str | None]]:
    """(id, CLIENT_SECRET, REFRESH_TOKEN, cached access token) of exactly these accounts (by id,
    not by range: an account created meanwhile inside the range must not push one out)."""
    rows = await session.execute(
        select(Account.id, Account.client_secret, Account.refresh_token, AccountState.access_token)
        .outerjoin(AccountState, AccountState.account_id == Account.id)
        .where(Account.id.in_(account_ids))
        .order_by(Account.id)
        .with_for_update(of=Account)
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def pending_verifiers_batch(
    session: AsyncSession, *, after: str, limit: int
) -> list[tuple[str, str, str]]:
    rows = await session.execute(
        select(
            PendingAuthorization.state_hash,
            PendingAuthorization.account_id,
            PendingAuthorization.code_verifier,
        )
        .where(PendingAuthorization.state_hash > after)
        .order_by(PendingAuthorization.state_hash)
        .limit(limit)
        .with_for_update()
    )
    return [(h, a, v) for h, a, v in rows]


async def set_pending_verifier(session: AsyncSession, state_hash: str, verifier: str) -> None:
    await session.execute(
        update(PendingAuthorization)
        .where(PendingAuthorization.state_hash == state_hash)
        .values(code_verifier=verifier)
        .execution_options(synchronize_session=False)
    )


async def set_account_secrets(
    session: AsyncSession, account_id: str, *, client_secret: str | None, refresh_token: str
) -> None:
    # Re-encryption leaves the plaintext unchanged, so VERSION is not bumped: an admin's
    # If-Match taken before a rotation stays valid.
    await session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(client_secret=client_secret, refresh_token=refresh_token)
        .execution_options(synchronize_session=False)
    )


async def set_state_token(session: AsyncSession, account_id: str, access_token: str | None) -> None:
    await session.execute(
        update(AccountState)
        .where(AccountState.account_id == account_id)
        .values(access_token=access_token)
        .execution_options(synchronize_session=False)
    )


async def sample_ciphertexts(session: AsyncSession, *, limit: int = 200) -> list[tuple[str, str, str]]:
    """(context column, row id, ciphertext) samples for the start-up key check."""
    samples: list[tuple[str, str, str]] = []
    rows = await session.execute(
        select(Account.id, Account.client_secret, Account.refresh_token).limit(limit)
    )
    for account_id, secret, refresh in rows:
        if secret:
            samples.append(("CLIENT_SECRET", account_id, secret))
        if refresh:
            samples.append(("REFRESH_TOKEN", account_id, refresh))
    return samples
