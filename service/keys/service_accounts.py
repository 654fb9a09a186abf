"""Service-account bindings managed through the API: which Kubernetes service account may call,
with which role and scope.

A binding is a caller exactly like a key (``binding_principal``): changes apply at once on this
replica (``KeyStore.put``/``remove``) and on the others at their next sync (within 5 s), which
also stops the tokens they remembered for a deleted binding.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.errors import InvalidInput, NameConflict, ServiceAccountNotFound
from service.keys import repository as repo
from service.keys.schemas import ServiceAccountCreate, ServiceAccountOut, ServiceAccountPatch
from service.keys.service import binding_principal, check_accounts, refuse_scoped_admin
from service.keys.store import KeyStore
from service.kit import timeutil
from service.models import ServiceAccount


def _out(binding: ServiceAccount, accounts: Sequence[str] | None) -> ServiceAccountOut:
    return ServiceAccountOut(
        id=binding.id,
        namespace=binding.namespace,
        name=binding.name,
        role=binding.role,
        accounts=sorted(set(accounts or ())) if binding.scoped else None,
        created_at=binding.created_at,
        last_used_at=binding.last_used_at,
    )


class ServiceAccountService:
    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], keystore: KeyStore) -> None:
        self._sessions = sessions
        self._keystore = keystore

    async def create(self, data: ServiceAccountCreate, *, actor: str | None) -> ServiceAccountOut:
        refuse_scoped_admin(data.role, data.accounts)
        now = timeutil.utcnow()
        binding = ServiceAccount(
            id=str(uuid.uuid4()),
            namespace=data.namespace,
            name=data.name,
            role=data.role,
            scoped=data.accounts is not None,
            created_at=now,
            updated_at=now,
        )
        async with self._sessions() as session, session.begin():
            await check_accounts(session, data.accounts)
            if not await repo.insert_binding(session, binding):
                raise NameConflict(f"A binding for {data.namespace}/{data.name} already exists.")
            await repo.set_binding_scope(session, binding.id, data.accounts or [])
            await accounts_repo.add_event(
                session,
                account_id=None,
                kind="service_account_bound",
                actor=actor,
                detail={"service_account_id": binding.id, "namespace": data.namespace, "name": data.name},
            )
        self._keystore.put(binding_principal(binding, data.accounts))
        return _out(binding, data.accounts)

    async def page(self, *, limit: int, offset: int) -> list[ServiceAccountOut]:
        async with self._sessions() as session:
            bindings = await repo.list_bindings(session, limit=limit, offset=offset)
            scopes = await repo.binding_scopes(session, [b.id for b in bindings])
        return [_out(b, scopes.get(b.id, [])) for b in bindings]

    async def get(self, binding_id: str) -> ServiceAccountOut:
        async with self._sessions() as session:
            binding = await repo.get_binding(session, binding_id)
            if binding is None:
                raise ServiceAccountNotFound()
            scopes = await repo.binding_scopes(session, [binding_id])
        return _out(binding, scopes.get(binding_id, []))

    async def patch(
        self, binding_id: str, data: ServiceAccountPatch, *, actor: str | None
    ) -> ServiceAccountOut:
        fields = data.model_fields_set
        async with self._sessions() as session, session.begin():
            binding = await repo.get_binding(session, binding_id)
            if binding is None:
                raise ServiceAccountNotFound()
            scopes = (await repo.binding_scopes(session, [binding_id])).get(binding_id, [])
            if "role" in fields:
                if data.role is None:
                    raise InvalidInput(
                        "role may not be null",
                        [
                            {
                                "loc": ["body", "role"],
                                "msg": "role may not be null",
                                "type": "null_not_allowed",
                            }
                        ],
                    )
                binding.role = data.role
            accounts = data.accounts if "accounts" in fields else (scopes if binding.scoped else None)
            refuse_scoped_admin(binding.role, accounts)
            if "accounts" in fields:
                await check_accounts(session, data.accounts)
                binding.scoped = data.accounts is not None
                await repo.set_binding_scope(session, binding_id, data.accounts or [])
                scopes = (await repo.binding_scopes(session, [binding_id])).get(binding_id, [])
            binding.updated_at = timeutil.utcnow()
            await session.flush()
            await accounts_repo.add_event(
                session,
                account_id=None,
                kind="service_account_changed",
                actor=actor,
                detail={"service_account_id": binding_id, "fields": sorted(fields)},
            )
        self._keystore.put(binding_principal(binding, scopes))
        return _out(binding, scopes)

    async def delete(self, binding_id: str, *, actor: str | None) -> None:
        async with self._sessions() as session, session.begin():
            if await repo.get_binding(session, binding_id) is None:
                raise ServiceAccountNotFound()
            await repo.delete_binding(session, binding_id)
            await accounts_repo.add_event(
                session,
                account_id=None,
                kind="service_account_unbound",
                actor=actor,
                detail={"service_account_id": binding_id},
            )
        self._keystore.remove(binding_id)
