"""Workload identity federation: the client assertion is the projected service-account token.

Invariants: the token file is read again whenever its modification time, size or inode changes
(the kubelet swaps the projected token in place long before it expires), and otherwise served from
memory; its content is never logged or put in a message; a missing, unreadable, empty, malformed or
expired file is ``InvalidCredentials`` naming the setting (the account cannot authenticate until a
person or the kubelet fixes the file). Scope: one reader per process, shared by every account.
Such a refusal is lifted by ``recover`` once the file works again: the account's state goes back
to ``ready`` and its VERSION moves, so every replica drops its hold within a sync interval.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import jwt
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as repo
from service.accounts.status import Status
from service.errors import InvalidCredentials

log = logging.getLogger("service.accounts")
SETTING = "BROKER_FEDERATED_TOKEN_FILE"
FILE_ERROR = "federated_token_file"  # last_error code of an account whose assertion failed here
_MAX_BYTES = 64 * 1024
_LEEWAY = 30  # seconds: a token this close to its exp would expire on the way to Azure


def _fail(why: str) -> InvalidCredentials:
    detail = (
        f"The federated token file ({SETTING}, default AZURE_FEDERATED_TOKEN_FILE) {why}; "
        "check the projected service-account token volume"
    )
    return InvalidCredentials(detail, idp_code=FILE_ERROR)


class FederatedTokenFile:
    """Reads the token file named by the setting; ``assertion`` has ``ClientAssertion``'s shape."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token: str | None = None
        self._exp: float | None = None
        self._lock = threading.Lock()
        self.reads = 0  # how often the file was read (tests: re-read only on change)

    def __repr__(self) -> str:
        return f"FederatedTokenFile({self.path!r})"

    def assertion(self, audience: str, now: float) -> str:
        if not self.path:
            raise _fail("is not set")
        try:
            stat = os.stat(self.path)
        except OSError as exc:
            raise _fail(f"cannot be read ({exc.strerror or type(exc).__name__})") from None
        seen = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if seen != self._seen:
                self._token, self._exp = self._read(stat.st_size)
                self._seen = seen
            token, exp = self._token, self._exp
        assert token is not None
        if exp is not None and exp <= now + _LEEWAY:
            raise _fail("holds an expired token")
        return token

    def _read(self, size: int) -> tuple[str, float | None]:
        if size > _MAX_BYTES:
            raise _fail(f"is larger than {_MAX_BYTES} bytes")
        assert self.path is not None
        try:
            with open(self.path, encoding="ascii") as handle:
                token = handle.read(_MAX_BYTES).strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise _fail(f"cannot be read ({reason or type(exc).__name__})") from None
        self.reads += 1
        if not token:
            raise _fail("is empty")
        try:
            claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _fail("does not hold a JWT") from None
        exp = claims.get("exp")
        log.info("federated token file read", extra={"bytes": size})
        return token, float(exp) if isinstance(exp, int | float) else None


async def recover(
    sessions: async_sessionmaker[AsyncSession], reader: FederatedTokenFile, now: float
) -> list[str]:
    """Accounts that failed only because of the token file, made ready again when it works now."""
    async with sessions() as session:
        failed = await repo.accounts_failed_with(session, FILE_ERROR)
    if not failed:
        return []
    try:
        reader.assertion("", now)
    except InvalidCredentials:
        return []  # still broken: nothing changes
    recovered = []
    for account_id in failed:
        async with sessions() as session, session.begin():
            row = await repo.lock_account_state(session, account_id)
            if row is None or row[1].last_error_code != FILE_ERROR:
                continue
            await repo.update_state(
                session,
                account_id,
                {"status": Status.READY, "last_error_code": None, "last_error_message": None, "failures": 0},
            )
            await repo.update_account_columns(session, account_id, {}, expected_version=None)
            detail = {"from": row[1].status, "to": Status.READY, "code": "federated_token_file_readable"}
            await repo.add_event(session, account_id=account_id, kind="status_changed", detail=detail)
        recovered.append(account_id)
    if recovered:
        log.info("federated token file readable again", extra={"count": len(recovered)})
    return recovered
