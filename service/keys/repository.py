"""SQL of caller keys and service-account bindings: only key hashes are stored; a scope is a set
of account ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.kit.timeutil import storable_id
from service.models import ApiKey, ApiKeyScope, ServiceAccount, ServiceAccountScope


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


async def key_by_hash(session: AsyncSession, key_hash: str) -> tuple[ApiKey, list[str]] | None:
    """The key with this hash and its scope, or None."""
    key = (await session.execute(select(ApiKey).where(ApiKey.key_hash == key_hash))).scalar_one_or_none()
    if key is None:
        return None
    return key, (await key_scopes(session, [key.id])).get(key.id, [])


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


# -- service-account bindings ---------------------------------------------------------------------


async def insert_binding(session: AsyncSession, binding: ServiceAccount) -> bool:
    """Add a binding and flush; False when (namespace, name) is taken (the transaction is then
    unusable: the caller rolls back)."""
    session.add(binding)
    try:
        await session.flush()
    except IntegrityError:
        return False
    return True


async def list_bindings(session: AsyncSession, *, limit: int, offset: int) -> list[ServiceAccount]:
    stmt = select(ServiceAccount).order_by(ServiceAccount.created_at, ServiceAccount.id)
    return list((await session.execute(stmt.limit(limit).offset(offset))).scalars())


async def all_bindings(session: AsyncSession) -> list[ServiceAccount]:
    return list((await session.execute(select(ServiceAccount))).scalars())


async def get_binding(session: AsyncSession, binding_id: str) -> ServiceAccount | None:
    if not storable_id(binding_id):
        return None
    found = await session.get(ServiceAccount, binding_id)
    return found if found is not None and found.id == binding_id else None


async def binding_by_subject(
    session: AsyncSession, namespace: str, name: str
) -> tuple[ServiceAccount, list[str]] | None:
    """The binding for (namespace, name) and its scope, or None."""
    stmt = select(ServiceAccount).where(ServiceAccount.namespace == namespace, ServiceAccount.name == name)
    found = (await session.execute(stmt)).scalar_one_or_none()
    if found is None:
        return None
    return found, (await binding_scopes(session, [found.id])).get(found.id, [])


async def binding_scopes(session: AsyncSession, ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    stmt = select(ServiceAccountScope.binding_id, ServiceAccountScope.account_id).order_by(
        ServiceAccountScope.account_id
    )
    if ids is not None:
        stmt = stmt.where(ServiceAccountScope.binding_id.in_(ids))
    scopes: dict[str, list[str]] = {}
    for binding_id, account_id in await session.execute(stmt):
        scopes.setdefault(binding_id, []).append(account_id)
    return scopes


async def set_binding_scope(session: AsyncSession, binding_id: str, account_ids: Sequence[str]) -> None:
    await session.execute(delete(ServiceAccountScope).where(ServiceAccountScope.binding_id == binding_id))
    for account_id in dict.fromkeys(account_ids):
        session.add(ServiceAccountScope(binding_id=binding_id, account_id=account_id))
    await session.flush()


async def delete_binding(session: AsyncSession, binding_id: str) -> None:
    await session.execute(delete(ServiceAccount).where(ServiceAccount.id == binding_id))


async def touch_bindings(session: AsyncSession, used: Mapping[str, datetime]) -> None:
    for binding_id, when in used.items():
        await session.execute(
            update(ServiceAccount)
            .where(ServiceAccount.id == binding_id)
            .values(last_used_at=when)
            .execution_options(synchronize_session=False)
        )
