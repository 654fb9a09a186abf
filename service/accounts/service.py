"""Managing integration accounts: validation, encryption, the default flag, history.

Free of FastAPI. Every change runs in one transaction: the account row (VERSION + 1), its state
row and an event commit together or not at all, so a rejected request changes nothing. Changing
anything a token depends on drops the cached token here (``AccountListener``) and, through VERSION,
on every replica.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import kinds
from service.accounts import repository as repo
from service.accounts.credentials import AccountSecrets
from service.accounts.schemas import AccountCreate, AccountOut, AccountPatch, EventOut, LastError
from service.accounts.status import Status
from service.errors import AccountNotFound, InvalidInput, VersionConflict
from service.kit import sealing, timeutil
from service.kit.crypto import Keyring
from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.models import Account, AccountCredential, AccountState, Event

URL_FIELDS = ("authorization_url", "token_url", "api_url")
# Fields a token depends on: changing one makes the cached token and the last error moot.
CREDENTIAL_FIELDS = frozenset(
    {"tenant_id", "client_id", "client_secret", "refresh_token", "token_url", "api_url", "grant_type"}
    | {"credential_type", "certificate"}
)
SECRET_FIELDS = frozenset({"client_secret", "refresh_token"})
COLUMN_FIELDS = frozenset(
    {"name", "default_account", "tenant_id", "client_id", "client_secret", "refresh_token"} | set(URL_FIELDS)
)


def initial_status(grant_type: str, has_refresh_token: bool) -> str:
    if grant_type == "authorization_code" and not has_refresh_token:
        return Status.NEEDS_AUTHORIZATION
    return Status.READY


def to_out(
    account: Account, state: AccountState, credential: AccountCredential | bool | None = True
) -> AccountOut:
    """``credential``: the credentials row, or True for the one loaded with ``account``."""
    cred = account.credential if credential is True else credential or None
    kind = cred.credential_type if cred else "client_secret"
    has_refresh = bool(account.refresh_token)
    status = state.status
    if state.grant_type == "authorization_code" and not has_refresh and status != Status.INVALID_CREDENTIALS:
        status = Status.NEEDS_AUTHORIZATION
    last_error = None
    if state.last_error_code:
        last_error = LastError(
            code=state.last_error_code, message=state.last_error_message, at=state.last_error_at
        )
    return AccountOut(
        id=account.id,
        version=account.version or 0,
        name=account.name,
        default_account=bool(account.default_account),
        tenant_id=account.tenant_id,
        client_id=account.client_id,
        authorization_url=account.authorization_url,
        token_url=account.token_url,
        api_url=account.api_url,
        grant_type=state.grant_type,
        credential_type=kind,
        has_client_secret=bool(account.client_secret),
        has_previous_client_secret=bool(cred and cred.previous_client_secret),
        certificate_thumbprint=cred.certificate_thumbprint if cred else None,
        client_secret_expires_at=cred.credential_expires_at if cred and kind == "client_secret" else None,
        credential_expires_at=cred.credential_expires_at if cred else None,
        has_refresh_token=has_refresh,
        status=status,
        token_expires_at=state.token_expires_at,
        last_refreshed_at=state.last_refreshed_at,
        last_error=last_error,
    )


def event_out(event: Event) -> EventOut:
    import json

    return EventOut(
        id=event.id,
        account_id=event.account_id,
        kind=event.kind,
        actor=event.actor,
        detail=json.loads(event.detail) if event.detail else None,
        created_at=event.created_at,
    )


class AccountListener(Protocol):
    """Who must hear of a committed change (the token broker): this module writes no one else's state."""

    def account_changed(
        self,
        account_id: str,
        *,
        credentials: bool = False,
        deleted: bool = False,
        default: bool | None = None,
    ) -> None: ...


class AccountService:
    def __init__(
        self,
        *,
        sessions: async_sessionmaker[AsyncSession],
        keyring: Keyring,
        policy: OutboundPolicy,
        listener: AccountListener,
    ) -> None:
        self._sessions = sessions
        self._keyring = keyring
        self._policy = policy
        self._listener = listener
        self._secrets = AccountSecrets(keyring)

    def check_urls(self, values: Mapping[str, Any]) -> None:
        errors: list[dict[str, Any]] = []
        for name in URL_FIELDS:
            url = values.get(name)
            if url is None:
                continue
            try:
                self._policy.check(url)
            except OutboundURLError as exc:
                errors.append({"loc": ["body", name], "msg": f"{name} {exc}", "type": "url_not_allowed"})
        if errors:
            raise InvalidInput("; ".join(str(e["msg"]) for e in errors), errors)

    async def create(self, data: AccountCreate, *, actor: str | None) -> AccountOut:
        self.check_urls(data.model_dump())
        kinds.check(data.credential_type, data.model_dump(exclude_unset=True), needs_certificate=True)
        account_id = str(uuid.uuid4())
        now = timeutil.utcnow()
        credential = AccountCredential(
            **({"previous_secret_in_use": False} | kinds.cleared_for(data.credential_type)),
            account_id=account_id,
            updated_at=now,
        )
        if data.certificate:
            for name, value in kinds.certificate_columns(self._keyring, account_id, data.certificate).items():
                setattr(credential, name, value)
        elif data.credential_type == "client_secret":
            credential.credential_expires_at = kinds.naive_utc(data.client_secret_expires_at)
        account = Account(
            id=account_id,
            version=1,
            default_account=data.default_account,
            tenant_id=data.tenant_id,
            name=data.name,
            client_id=data.client_id,
            client_secret=sealing.seal(self._keyring, sealing.CLIENT_SECRET, account_id, data.client_secret),
            refresh_token=sealing.seal(
                self._keyring, sealing.REFRESH_TOKEN, account_id, data.refresh_token or ""
            )
            or "",
            authorization_url=data.authorization_url,
            token_url=data.token_url,
            api_url=data.api_url,
        )
        state = AccountState(
            account_id=account_id,
            grant_type=data.grant_type,
            status=initial_status(data.grant_type, bool(data.refresh_token)),
            failures=0,
            created_at=now,
            updated_at=now,
        )
        async with self._sessions() as session, session.begin():
            if data.default_account:
                await repo.lock_default_mutex(session)
                await repo.clear_default(session, except_id=account_id)
            await repo.insert_account(session, account, state, credential)
            await repo.add_event(
                session,
                account_id=account_id,
                kind="created",
                actor=actor,
                detail={
                    "name": data.name,
                    "grant_type": data.grant_type,
                    "credential_type": data.credential_type,
                },
            )
        if data.default_account:
            self._listener.account_changed(account_id, default=True)
        return to_out(account, state, credential)

    async def page(
        self, *, limit: int, offset: int, credential_expires_before: datetime | None = None
    ) -> list[AccountOut]:
        async with self._sessions() as session:
            rows = await repo.list_accounts(
                session,
                limit=limit,
                offset=offset,
                credential_expires_before=kinds.naive_utc(credential_expires_before),
            )
        return [to_out(a, s) for a, s in rows]

    async def get(self, account_id: str) -> AccountOut:
        async with self._sessions() as session:
            row = await repo.get_account(session, account_id)
        if row is None:
            raise AccountNotFound(account_id)
        return to_out(*row)

    async def patch(
        self, account_id: str, patch: AccountPatch, *, if_match: int | None, actor: str | None
    ) -> AccountOut:
        changes = patch.changes()
        for name in (
            "name",
            "tenant_id",
            "client_id",
            "authorization_url",
            "token_url",
            "api_url",
            "default_account",
            "grant_type",
        ):
            if name in changes and changes[name] is None:
                raise InvalidInput(
                    f"{name} may not be null",
                    [{"loc": ["body", name], "msg": f"{name} may not be null", "type": "null_not_allowed"}],
                )
        self.check_urls(changes)
        async with self._sessions() as session, session.begin():
            if changes.get("default_account"):
                await repo.lock_default_mutex(session)
            row = await repo.lock_account_state(session, account_id)
            if row is None:
                raise AccountNotFound(account_id)
            account, state = row
            if if_match is not None and (account.version or 0) != if_match:
                raise VersionConflict(
                    f"The account is at version {account.version or 0}, not {if_match}: read it again."
                )
            columns = self._columns(account_id, changes)
            credential = kinds.patch_values(self._keyring, self._secrets, account, changes)
            if "credential_type" in credential and credential["credential_type"] != "client_secret":
                columns["client_secret"] = None  # no stored secret outlives its kind
            if credential:
                await repo.save_credential(session, account_id, credential)
            if changes.get("default_account"):
                await repo.clear_default(session, except_id=account_id)
            await repo.update_account_columns(session, account_id, columns, expected_version=None)
            if CREDENTIAL_FIELDS & changes.keys():
                await self._reset_state(session, account, state, changes)
            await repo.add_event(
                session,
                account_id=account_id,
                kind="updated",
                actor=actor,
                detail={"fields": sorted(changes)},
            )
            row = await repo.get_account(session, account_id)
            assert row is not None
        self._listener.account_changed(
            account_id,
            credentials=bool(CREDENTIAL_FIELDS & changes.keys()),
            default=bool(changes["default_account"]) if "default_account" in changes else None,
        )
        return to_out(*row)

    def _columns(self, account_id: str, changes: Mapping[str, Any]) -> dict[str, Any]:
        columns = {k: v for k, v in changes.items() if k in COLUMN_FIELDS}
        if "client_secret" in columns:
            columns["client_secret"] = sealing.seal(
                self._keyring, sealing.CLIENT_SECRET, account_id, columns["client_secret"]
            )
        if "refresh_token" in columns:
            columns["refresh_token"] = (
                sealing.seal(self._keyring, sealing.REFRESH_TOKEN, account_id, columns["refresh_token"] or "")
                or ""
            )
        return columns

    async def _reset_state(
        self, session: AsyncSession, account: Account, state: AccountState, changes: Mapping[str, Any]
    ) -> None:
        grant_type = changes.get("grant_type") or state.grant_type
        has_refresh = (
            bool(changes["refresh_token"]) if "refresh_token" in changes else bool(account.refresh_token)
        )
        status = initial_status(grant_type, has_refresh)
        await repo.update_state(
            session,
            account.id,
            {
                "grant_type": grant_type,
                "status": status,
                "access_token": None,
                "token_expires_at": None,
                "last_error_code": None,
                "last_error_message": None,
                "next_attempt_at": None,
                "failures": 0,
            },
        )
        if status != state.status:
            await repo.add_event(
                session,
                account_id=account.id,
                kind="status_changed",
                detail={"from": state.status, "to": status},
            )

    async def delete(self, account_id: str, *, actor: str | None) -> None:
        async with self._sessions() as session, session.begin():
            # Looked up exactly first: a case-insensitive collation must not delete a near-miss id.
            if await repo.lock_account_state(session, account_id) is None:
                raise AccountNotFound(account_id)
            await repo.delete_account(session, account_id)
            await repo.add_event(session, account_id=account_id, kind="deleted", actor=actor)
        self._listener.account_changed(account_id, deleted=True)

    async def events(self, account_id: str, *, limit: int, offset: int) -> list[EventOut]:
        async with self._sessions() as session:
            if await repo.get_account(session, account_id) is None:
                raise AccountNotFound(account_id)
            rows = await repo.list_events(session, account_id, limit=limit, offset=offset)
        return [event_out(e) for e in rows]
