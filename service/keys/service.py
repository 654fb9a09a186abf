"""Caller keys managed through the API: created once, stored as hashes, scoped to accounts.

A new key is shown only in the response that creates it. Changes apply at once on this replica
(``KeyStore.put``/``remove``) and on the others at their next sync (within 5 s).

A request that loses a race to a concurrent delete (of the key, or of an account it names) gets
what it would have got had it come second (404 ``key_not_found``, 422 unknown account), never a
503: the database's IntegrityError/StaleDataError is translated here, after a fresh look.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from service.accounts import repository as accounts_repo
from service.errors import InvalidInput, KeyNotFound
from service.keys import repository as repo
from service.keys.schemas import KeyCreate, KeyCreated, KeyOut, KeyPatch
from service.keys.store import KeyStore, Principal, hash_key, new_key
from service.kit import timeutil
from service.models import ApiKey


def _principal(key: ApiKey, accounts: Sequence[str] | None) -> Principal:
    scope = frozenset(accounts or ()) if key.scoped else None
    return Principal(key.id, key.role, scope, "k_" + key.key_hash[:10], key.key_hash)


async def load_principals(session: AsyncSession) -> list[Principal]:
    keys = await repo.all_keys(session)
    scopes = await repo.key_scopes(session)
    return [_principal(k, scopes.get(k.id, [])) for k in keys]


def _out(key: ApiKey, accounts: Sequence[str] | None) -> KeyOut:
    return KeyOut(
        id=key.id,
        name=key.name,
        role=key.role,
        accounts=sorted(set(accounts or ())) if key.scoped else None,
        prefix=key.prefix,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
    )


class KeyService:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], keystore: KeyStore) -> None:
        self._sessions = sessions
        self._keystore = keystore

    async def _check_accounts(self, session: AsyncSession, accounts: Sequence[str] | None) -> None:
        if not accounts:
            return
        missing = sorted(set(accounts) - await accounts_repo.existing_account_ids(session, accounts))
        if missing:
            raise InvalidInput(
                f"Unknown account ids in accounts: {', '.join(missing[:5])}",
                [{"loc": ["body", "accounts"], "msg": "unknown account id", "type": "unknown_account"}],
            )

    @staticmethod
    def _refuse_scoped_admin(role: str, accounts: Sequence[str] | None) -> None:
        # Scopes limit which tokens a key may fetch; an admin key can manage accounts and mint keys,
        # so a scope on it would be a promise the broker does not keep.
        if role == "admin" and accounts is not None:
            raise InvalidInput(
                "Admin keys cannot be scoped to accounts; use a client key with accounts.",
                [{"loc": ["body", "accounts"], "msg": "admin keys are unscoped", "type": "scoped_admin"}],
            )

    async def create(self, data: KeyCreate, *, actor: str | None) -> KeyCreated:
        self._refuse_scoped_admin(data.role, data.accounts)
        raw = new_key()
        now = timeutil.utcnow()
        key = ApiKey(
            id=str(uuid.uuid4()),
            name=data.name,
            role=data.role,
            key_hash=hash_key(raw),
            prefix=raw[:10],
            scoped=data.accounts is not None,
            created_at=now,
            updated_at=now,
        )
        try:
            async with self._sessions() as session, session.begin():
                await self._check_accounts(session, data.accounts)
                await repo.insert_key(session, key)
                await repo.set_key_scope(session, key.id, data.accounts or [])
                await accounts_repo.add_event(
                    session,
                    account_id=None,
                    kind="key_created",
                    actor=actor,
                    detail={"key_id": key.id, "role": key.role, "accounts": data.accounts},
                )
        except IntegrityError:
            await self._lost_race(None, data.accounts)
            raise
        self._keystore.put(_principal(key, data.accounts))
        out = _out(key, data.accounts)
        return KeyCreated(**out.model_dump(), key=raw)

    async def page(self, *, limit: int, offset: int) -> list[KeyOut]:
        async with self._sessions() as session:
            keys = await repo.list_keys(session, limit=limit, offset=offset)
            scopes = await repo.key_scopes(session, [k.id for k in keys])
        return [_out(k, scopes.get(k.id, [])) for k in keys]

    async def get(self, key_id: str) -> KeyOut:
        async with self._sessions() as session:
            key = await repo.get_key(session, key_id)
            if key is None:
                raise KeyNotFound()
            scopes = await repo.key_scopes(session, [key_id])
        return _out(key, scopes.get(key_id, []))

    async def _lost_race(self, key_id: str | None, accounts: Sequence[str] | None) -> None:
        """After a write failed on a vanished row: raise what a request coming second would get."""
        async with self._sessions() as session:
            if key_id is not None and await repo.get_key(session, key_id) is None:
                raise KeyNotFound()
            await self._check_accounts(session, accounts)

    async def patch(self, key_id: str, data: KeyPatch, *, actor: str | None) -> KeyOut:
        try:
            return await self._patch(key_id, data, actor=actor)
        except (IntegrityError, StaleDataError):
            await self._lost_race(key_id, data.accounts if "accounts" in data.model_fields_set else None)
            raise

    async def _patch(self, key_id: str, data: KeyPatch, *, actor: str | None) -> KeyOut:
        fields = data.model_fields_set
        async with self._sessions() as session, session.begin():
            key = await repo.get_key(session, key_id)
            if key is None:
                raise KeyNotFound()
            if "name" in fields:
                if data.name is None:
                    raise InvalidInput(
                        "name may not be null",
                        [
                            {
                                "loc": ["body", "name"],
                                "msg": "name may not be null",
                                "type": "null_not_allowed",
                            }
                        ],
                    )
                key.name = data.name
            if "accounts" in fields:
                self._refuse_scoped_admin(key.role, data.accounts)
                await self._check_accounts(session, data.accounts)
                key.scoped = data.accounts is not None
                await repo.set_key_scope(session, key_id, data.accounts or [])
            key.updated_at = timeutil.utcnow()
            await session.flush()
            scopes = (await repo.key_scopes(session, [key_id])).get(key_id, [])
            await accounts_repo.add_event(
                session,
                account_id=None,
                kind="key_changed",
                actor=actor,
                detail={"key_id": key_id, "fields": sorted(fields)},
            )
        self._keystore.put(_principal(key, scopes))
        return _out(key, scopes)

    async def delete(self, key_id: str, *, actor: str | None) -> None:
        async with self._sessions() as session, session.begin():
            # Both checks: a concurrent DELETE may remove the row between the read and ours.
            if await repo.get_key(session, key_id) is None or not await repo.delete_key(session, key_id):
                raise KeyNotFound()
            await accounts_repo.add_event(
                session, account_id=None, kind="key_revoked", actor=actor, detail={"key_id": key_id}
            )
        self._keystore.remove(key_id)
