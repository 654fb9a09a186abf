"""Caller keys managed through the API: created once, stored as hashes, scoped to accounts.

A new key is shown only in the response that creates it. Changes apply at once on this replica
(``KeyStore.put``/``remove``) and on the others at their next sync (within 5 s); a new key works on
the others at once, because a key not in memory is looked up by its hash before a 401 (``resolve``:
one query per key, shared by concurrent callers, never for keys no replica made).

A request that loses a race to a concurrent delete (of the key, or of an account it names) gets
what it would have got had it come second (404 ``key_not_found``, 422 unknown account), never a
503: the database's IntegrityError/StaleDataError is translated here, after a fresh look.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from service.accounts import repository as accounts_repo
from service.errors import InvalidInput, KeyNotFound, StorageUnavailable
from service.keys import repository as repo
from service.keys.k8s import looks_like_jwt
from service.keys.schemas import KeyCreate, KeyCreated, KeyOut, KeyPatch
from service.keys.store import KeyStore, Principal, hash_key
from service.kit import timeutil
from service.models import ApiKey, ServiceAccount


def binding_principal(binding: ServiceAccount, accounts: Sequence[str] | None) -> Principal:
    """A service-account binding as a caller: a principal of its role and scope, like a key."""
    scope = frozenset(accounts or ()) if binding.scoped else None
    fingerprint = f"sa:{binding.namespace}/{binding.name}"
    return Principal(
        binding.id, binding.role, scope, fingerprint, "sa:" + binding.id, (binding.namespace, binding.name)
    )


def _principal(key: ApiKey, accounts: Sequence[str] | None) -> Principal:
    scope = frozenset(accounts or ()) if key.scoped else None
    return Principal(key.id, key.role, scope, "k_" + key.key_hash[:10], key.key_hash)


async def load_principals(session: AsyncSession) -> list[Principal]:
    """Every managed caller: the keys and the service-account bindings, one model."""
    keys = await repo.all_keys(session)
    scopes = await repo.key_scopes(session)
    bindings = await repo.all_bindings(session)
    binding_scopes = await repo.binding_scopes(session)
    return [_principal(k, scopes.get(k.id, [])) for k in keys] + [
        binding_principal(b, binding_scopes.get(b.id, [])) for b in bindings
    ]


async def check_accounts(session: AsyncSession, accounts: Sequence[str] | None) -> None:
    """422 when a scope names accounts that do not exist."""
    if not accounts:
        return
    missing = sorted(set(accounts) - await accounts_repo.existing_account_ids(session, accounts))
    if missing:
        raise InvalidInput(
            f"Unknown account ids in accounts: {', '.join(missing[:5])}",
            [{"loc": ["body", "accounts"], "msg": "unknown account id", "type": "unknown_account"}],
        )


def refuse_scoped_admin(role: str, accounts: Sequence[str] | None) -> None:
    # Scopes limit which tokens a caller may fetch; an admin can manage accounts and mint keys,
    # so a scope on it would be a promise the broker does not keep.
    if role == "admin" and accounts is not None:
        raise InvalidInput(
            "Admin keys cannot be scoped to accounts; use a client key with accounts.",
            [{"loc": ["body", "accounts"], "msg": "admin keys are unscoped", "type": "scoped_admin"}],
        )


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


class TokenVerifier(Protocol):
    async def verify(
        self, raw: str, find_binding: Callable[[str, str], Awaitable[Principal | None]]
    ) -> Principal | None: ...


class KeyService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        keystore: KeyStore,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self._sessions = sessions
        self._keystore = keystore
        self._verifier = verifier
        self._lookups: dict[str, asyncio.Future[Principal | None]] = {}

    async def resolve(self, raw: str) -> Principal | None:
        """The principal of ``raw``: from memory, else a service-account token verified, else (for
        a key some replica made) from the database by its hash. Raises ``StorageUnavailable`` or
        ``IssuerUnavailable`` when the database or the cluster cannot say."""
        found = self._keystore.lookup(raw)
        if found is not None:
            return found
        if self._verifier is not None and looks_like_jwt(raw):
            return await self._verifier.verify(raw, self.find_binding)  # never a key
        digest = self._keystore.worth_looking_up(raw)
        if digest is None:
            return None
        flight = self._lookups.get(digest)
        if flight is None:  # registered before the first await: concurrent callers share one query
            flight = asyncio.ensure_future(self._look_up(digest))
            self._lookups[digest] = flight
            flight.add_done_callback(lambda _: self._lookups.pop(digest, None))
        if await asyncio.shield(flight) is None:
            return None
        return self._keystore.lookup(raw) or await asyncio.shield(flight)

    async def find_binding(self, namespace: str, name: str) -> Principal | None:
        """A binding not in memory (made on another replica since the last sync), from the
        database; one query per (namespace, name) per sync interval at most."""
        if not self._keystore.binding_worth_looking_up(namespace, name):
            return None
        mark = self._keystore.mark()
        try:
            async with self._sessions() as session:
                row = await repo.binding_by_subject(session, namespace, name)
        except (SQLAlchemyError, OSError):
            raise StorageUnavailable(
                "The database cannot be reached; try again.", reason="database"
            ) from None
        if row is None:
            self._keystore.binding_absent(namespace, name)
            return None
        principal = binding_principal(*row)
        self._keystore.learn(principal, since=mark)
        return principal

    async def _look_up(self, digest: str) -> Principal | None:
        mark = self._keystore.mark()
        try:
            async with self._sessions() as session:
                row = await repo.key_by_hash(session, digest)
        except (SQLAlchemyError, OSError):
            raise StorageUnavailable(
                "The database cannot be reached; try again.", reason="database"
            ) from None
        if row is None:
            self._keystore.absent(digest)
            return None
        principal = _principal(*row)
        self._keystore.learn(principal, since=mark)
        return principal

    async def _check_accounts(self, session: AsyncSession, accounts: Sequence[str] | None) -> None:
        await check_accounts(session, accounts)

    @staticmethod
    def _refuse_scoped_admin(role: str, accounts: Sequence[str] | None) -> None:
        refuse_scoped_admin(role, accounts)

    async def create(self, data: KeyCreate, *, actor: str | None) -> KeyCreated:
        self._refuse_scoped_admin(data.role, data.accounts)
        raw = self._keystore.mint()
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
