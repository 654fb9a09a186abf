"""Upstream pauses per account: known at once on this replica, through the database on the others.

Invariants:
* ``PauseBook`` only ever extends a pause (a later ``until`` wins; an earlier one changes
  nothing), so a replica that learns an older pause from the database cannot shorten its own.
* A pause noted here is written to ``broker_proxy_pause`` right away (in a task: the caller who
  saw the 429 is not held up by the database); the row too only moves forward.
* While the proxy is in use (a request in the last ``IN_USE_SECONDS``), ``PauseSync`` reads the
  pauses still running once per ``interval`` (one query for all accounts), so a pause set by
  another replica reaches this one within about a second. A replica whose poll has not run for
  two intervals (it was idle) reads them before its next request goes upstream (one query, shared
  by the callers who arrive meanwhile). A database error costs one round, never the proxy: pauses
  are an optimisation of what upstream enforces anyway.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.kit import timeutil
from service.proxy import repository as repo

log = logging.getLogger("service.proxy")

IN_USE_SECONDS = 10.0
WRITE_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 1.0


class PauseBook:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}

    def remaining(self, account_id: str) -> float:
        """Seconds until the account's pause ends (0 when it is not paused)."""
        until = self._until.get(account_id)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._until[account_id]
            return 0.0
        return left

    def extend(self, account_id: str, until: float) -> bool:
        """Pause the account until ``until`` (epoch seconds) unless it already is; True if it moved."""
        if until <= self.clock() or until <= self._until.get(account_id, 0.0):
            return False
        self._until[account_id] = until
        return True

    def merge(self, pauses: Iterable[tuple[str, float]]) -> None:
        for account_id, until in pauses:
            self.extend(account_id, until)

    def active_count(self) -> int:
        now = self.clock()
        for account_id in [a for a, until in self._until.items() if until <= now]:
            del self._until[account_id]
        return len(self._until)


class PauseSync:
    """Carries pauses between this replica's ``PauseBook`` and the database."""

    def __init__(
        self, book: PauseBook, sessions: async_sessionmaker[AsyncSession], *, interval: float = 1.0
    ) -> None:
        self.book = book
        self._sessions = sessions
        self.interval = interval
        self._last_use = -IN_USE_SECONDS
        self._polled_at = -math.inf
        self._polling: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def touch(self) -> None:
        self._last_use = self.book.clock()

    def in_use(self) -> bool:
        return self.book.clock() - self._last_use < IN_USE_SECONDS

    def pause(self, account_id: str, until: float) -> None:
        """Pause the account here now, and on the other replicas through the database."""
        if not self.book.extend(account_id, until):
            return
        task = asyncio.get_running_loop().create_task(self._write(account_id, until))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, account_id: str, until: float) -> None:
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_SECONDS), self._sessions() as session:
                await repo.extend_pause(session, account_id, timeutil.from_epoch(until))
                await session.commit()
        except (SQLAlchemyError, TimeoutError, OSError) as exc:
            log.warning(
                "proxy pause not stored", extra={"account_id": account_id, "error_type": type(exc).__name__}
            )

    async def poll_once(self) -> None:
        if not self.in_use():
            return
        await self._read()

    async def _read(self) -> None:
        started = self.book.clock()
        async with self._sessions() as session:
            rows = await repo.active_pauses(session, timeutil.from_epoch(started))
        self.book.merge((account_id, timeutil.to_epoch(until)) for account_id, until in rows)
        self._polled_at = started

    async def fresh(self) -> None:
        """Make sure the pauses are at most two intervals old (an idle replica reads them now)."""
        if self.book.clock() - self._polled_at <= 2 * self.interval:
            return
        if self._polling is None or self._polling.done():
            self._polling = asyncio.get_running_loop().create_task(self._read())
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):  # a slow database must not hold callers
                await asyncio.shield(self._polling)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("proxy pauses not read", extra={"error_type": type(exc).__name__})

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except (SQLAlchemyError, OSError) as exc:
                log.warning("proxy pauses not read", extra={"error_type": type(exc).__name__})
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=WRITE_TIMEOUT_SECONDS)
