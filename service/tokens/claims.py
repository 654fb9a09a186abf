"""A refresh claim (what claiming.py writes on the token row) and whether its owner still lives.

Invariants:
* On MySQL/MariaDB each replica holds the named lock ``broker-replica-<id>`` on one dedicated
  connection for as long as it runs (re-taken within about a second if the connection drops). The
  database releases it the moment the process or its connection dies, so a claim whose owner's
  lock is free (``IS_USED_LOCK`` is NULL) belongs to a dead replica and is taken over at once.
* This replica takes no claim before its own lock is held (else others would take its claims
  over while it is at Azure).
* On SQLite (one process) there are no named locks: a claim of this process's own earlier
  incarnation (another replica id) is honoured until it expires; a claim with this replica's own
  id is never live, because the single-flight runs one refresh per account in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.errors import StorageUnavailable
from service.models import Account
from service.tokens import repository as repo
from service.tokens.stored import Asked

log = logging.getLogger("service.broker")

PING_SECONDS = 1.0

CLEAR_CLAIM: dict[str, Any] = {
    "refresh_claim_owner": None,
    "refresh_claim_id": None,
    "refresh_claim_expires_at": None,
}


@dataclass(frozen=True)
class Claim:
    """This replica's claim on one account's refresh: what Azure is asked with, and when the
    stored token had last been refreshed as the claim read it (a later time: stored since)."""

    account: Account
    asked: Asked
    claim_id: str
    refreshed_at: datetime | None


class Unread:
    """``seen`` not read yet: the first claim transaction reads it."""


UNREAD = Unread()


@dataclass(frozen=True)
class Wait:
    """Another live replica holds the claim; ``seen``: the stored token's time as read."""

    seen: float | None


def lock_name(replica_id: str) -> str:
    return f"broker-replica-{replica_id}"


class ReplicaLiveness:
    def __init__(self, engine: AsyncEngine | None, *, replica_id: str | None = None) -> None:
        self.replica_id = replica_id or secrets.token_hex(8)
        self._engine = engine if engine is not None and engine.dialect.name == "mysql" else None
        self._held = asyncio.Event()
        self._failed = asyncio.Event()  # the last attempt to take the lock failed
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def named_locks(self) -> bool:
        return self._engine is not None

    async def ready(self, within: float) -> None:
        """Return once this replica's lock is held (at once on SQLite); StorageUnavailable as soon
        as an attempt to take it failed (the database is down: the keeper tries again every
        second), or if none succeeded within ``within`` seconds."""
        if self._engine is None or self._held.is_set():
            return
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._keep())
        if not self._failed.is_set():
            held = asyncio.ensure_future(self._held.wait())
            failed = asyncio.ensure_future(self._failed.wait())
            await asyncio.wait({held, failed}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
            held.cancel()
            failed.cancel()
        if not self._held.is_set():
            raise StorageUnavailable("The database cannot be reached.", reason="database")

    async def owner_alive(self, session: AsyncSession, owner: str | None) -> bool:
        if owner is None or owner == self.replica_id:
            return False
        if self._engine is None:
            return True  # SQLite: wait for the claim to expire
        return await repo.named_lock_in_use(session, lock_name(owner))

    async def _keep(self) -> None:
        assert self._engine is not None
        name = lock_name(self.replica_id)
        while not self._closed:
            connection: AsyncConnection | None = None
            try:
                connection = await self._engine.connect()
                if not await repo.take_named_lock(connection, name):
                    raise RuntimeError("replica lock held elsewhere")
                await connection.commit()
                self._failed.clear()
                self._held.set()
                while await repo.holds_named_lock(connection, name):
                    await connection.commit()
                    await asyncio.sleep(PING_SECONDS)
            except (SQLAlchemyError, OSError, RuntimeError) as exc:
                log.warning("replica lock lost", extra={"reason": type(exc).__name__})
                self._failed.set()
            finally:
                self._held.clear()
                if connection is not None:
                    # Invalidated, not returned to the pool: a pooled connection would keep the lock.
                    with contextlib.suppress(Exception):
                        await connection.invalidate()
                    with contextlib.suppress(Exception):
                        await connection.close()
            if not self._closed:
                await asyncio.sleep(PING_SECONDS)

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
