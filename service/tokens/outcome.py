"""What a refresh leaves in the database: the new tokens, or what went wrong and when to try again.

The broker decides when to refresh and what a failure means for waiting callers; this module
writes the result into the account's rows and its history, in the caller's session, so that
every replica (and an admin reading ``GET /accounts/{id}``) sees the same status.
A replaced client secret's fallback ends here too: the new secret's first success erases the
previous one, and each switch between them is an event.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from service.accounts import repository as accounts_repo
from service.accounts.federated import FILE_ERROR
from service.accounts.status import Status
from service.errors import ActionRequired, NeedsAuthorization, Unavailable, UpstreamUnavailable
from service.idp.azure_ad import TokenGrant
from service.kit import sealing, timeutil
from service.kit.crypto import Keyring
from service.models import Account, AccountState

log = logging.getLogger("service.broker")


async def record_failure(
    session: AsyncSession,
    state: AccountState,
    exc: ActionRequired | Unavailable,
    *,
    retry_at: datetime | None,
    retry_after: float,
    also: Mapping[str, Any] | None = None,
) -> None:
    """Write what went wrong, without committing: the caller commits it, although its caller gets
    an error (the history keeps it).

    A person must act on an ``ActionRequired``; anything else is transient and waits until
    ``retry_at`` (``retry_after`` seconds from now) before Azure is asked again."""
    account_id = state.account_id
    values: dict[str, Any] = {"last_error_at": timeutil.utcnow()}
    if isinstance(exc, ActionRequired):
        status = (
            Status.NEEDS_AUTHORIZATION if isinstance(exc, NeedsAuthorization) else Status.INVALID_CREDENTIALS
        )
        values |= {
            "status": status,
            "last_error_code": exc.idp_code or exc.code,
            "last_error_message": (exc.idp_message or exc.detail)[:1024],
            "next_attempt_at": None,
        }
    else:
        status = Status.FAILING
        values |= {
            "status": status,
            "failures": state.failures + 1,
            "last_error_code": exc.reason,
            "last_error_message": exc.detail[:1024],
            "next_attempt_at": retry_at,
        }
    log.warning(
        "token refresh failed",
        extra={
            "account_id": account_id,
            "code": values["last_error_code"],
            "to_status": status,
            "retry_after": round(retry_after, 1) if status == Status.FAILING else None,
        },
    )
    await accounts_repo.update_state(session, account_id, {**values, **(also or {})})
    detail = {"code": values["last_error_code"], "message": values["last_error_message"]}
    await accounts_repo.add_event(session, account_id=account_id, kind="refresh_failed", detail=detail)
    if status != state.status:
        await accounts_repo.add_event(
            session,
            account_id=account_id,
            kind="status_changed",
            detail={"from": state.status, "to": status, "code": values["last_error_code"]},
        )


async def record_grant(
    session: AsyncSession,
    keyring: Keyring,
    account: Account,
    state: AccountState,
    grant: TokenGrant,
    *,
    also: Mapping[str, Any] | None = None,
) -> int:
    """Write Azure's answer (a rotated refresh token, the access token, status ``ready``) without
    committing; returns the account's VERSION after it. ``also``: more state columns to write in
    the same statement (the refresh claim, cleared)."""
    version = account.version or 0
    if grant.refresh_token:
        sealed = sealing.seal(keyring, sealing.REFRESH_TOKEN, account.id, grant.refresh_token)
        stored = await accounts_repo.update_account_columns(
            session, account.id, {"refresh_token": sealed}, expected_version=version
        )
        if not stored:
            # An admin changed the account while Azure answered (possible on SQLite, where no
            # row lock is held): their values win; this result is dropped.
            raise UpstreamUnavailable("The account changed during the refresh; try again.", reason="conflict")
        version += 1
    await accounts_repo.update_state(
        session,
        account.id,
        {
            "access_token": sealing.seal(keyring, sealing.ACCESS_TOKEN, account.id, grant.access_token),
            "token_expires_at": timeutil.from_epoch(grant.expires_at),
            "last_refreshed_at": timeutil.utcnow(),
            "status": Status.READY,
            "last_error_code": None,
            "last_error_message": None,
            "next_attempt_at": None,
            "failures": 0,
            **(also or {}),
        },
    )
    await accounts_repo.add_event(
        session,
        account_id=account.id,
        kind="token_refreshed",
        detail={
            "expires_at": timeutil.from_epoch(grant.expires_at).isoformat() + "Z",
            "refresh_token_rotated": bool(grant.refresh_token),
        },
    )
    if state.status != Status.READY:
        await accounts_repo.add_event(
            session,
            account_id=account.id,
            kind="status_changed",
            detail={"from": state.status, "to": Status.READY},
        )
    await _note_secret_used(session, account, grant)
    return version


async def _note_secret_used(session: AsyncSession, account: Account, grant: TokenGrant) -> None:
    """Keep the previous secret while Azure accepts only it; erase it once the new one works."""
    cred = account.credential
    if cred is None or not cred.previous_client_secret:
        return
    if grant.used_previous_secret:
        if not cred.previous_secret_in_use:
            await accounts_repo.save_credential(session, account.id, {"previous_secret_in_use": True})
            await accounts_repo.add_event(
                session,
                account_id=account.id,
                kind="client_secret_fallback",
                detail={"using": "previous", "why": "Azure AD does not accept the new client secret yet"},
            )
            log.warning(
                "new client secret refused; the previous one is used", extra={"account_id": account.id}
            )
        return
    await accounts_repo.save_credential(
        session, account.id, {"previous_client_secret": None, "previous_secret_in_use": False}
    )
    await accounts_repo.add_event(
        session,
        account_id=account.id,
        kind="client_secret_switched",
        detail={"using": "new", "previous_erased": True},
    )
    log.info("new client secret accepted; the previous one is erased", extra={"account_id": account.id})


def action_text(state: AccountState) -> str:
    """What a person must do about an account that Azure refused, in plain words."""
    if state.status == Status.NEEDS_AUTHORIZATION:
        return (
            f"Azure AD refused this account's refresh token ({state.last_error_code}): "
            f"authorize it again (POST /accounts/{state.account_id}/authorize)."
        )
    if state.last_error_code == FILE_ERROR:
        return f"{state.last_error_message} (the account recovers when the file is readable again)."
    return (
        f"Azure AD rejected this account's client credentials ({state.last_error_code}): "
        "fix client_id, client_secret or certificate (PATCH the account)."
    )
