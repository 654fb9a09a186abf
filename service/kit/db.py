"""Engine and session factories: SQLite (embedded, one process) or MySQL/MariaDB (replicas).

Built by the app's lifespan from its settings, never at import time. MySQL sessions run at
READ COMMITTED with a bounded lock wait, so a refresh that locks an account's token row and
re-reads it sees what another replica committed, and never waits on a lock forever.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.errors import StorageUnavailable, UpstreamUnavailable
from service.settings import Settings

# MySQL connections kept per replica, and as many more under load. No connection waits on Azure:
# refreshes take at most 3 + 3 of them for their batched transactions (tokens/refresh.py), each for
# a few milliseconds; probes, the sync, the replica lock and the admin API use the rest.
POOL_SIZE = 10


def sqlite_path(url: str) -> Path | None:
    """The file behind a SQLite URL, or None for memory/other databases."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def create_engine(settings: Settings) -> AsyncEngine:
    url = settings.database_url
    if settings.is_sqlite:
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        engine = create_async_engine(url, connect_args={"timeout": settings.lock_wait_seconds})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    engine = create_async_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_size=POOL_SIZE,
        max_overflow=POOL_SIZE,
        pool_timeout=settings.lock_wait_seconds,
        isolation_level="READ COMMITTED",
        connect_args={"connect_timeout": 5},
    )
    lock_wait = int(settings.lock_wait_seconds)

    def _mysql_session(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute(f"SET SESSION innodb_lock_wait_timeout = {lock_wait}")
        cur.close()

    event.listen(engine.sync_engine, "connect", _mysql_session)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control from the driver (SQLAlchemy's documented recipe) so that
    # _sqlite_begin can start every transaction with the write lock: with deferred
    # transactions a read-then-write under WAL fails at once instead of waiting its turn.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    # Foreign keys give us ON DELETE CASCADE; WAL lets readers run beside the one writer.
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


LOCK_TIMEOUT = "A lock another request holds was not released in time; try again."


@asynccontextmanager
async def open_session(
    sessions: async_sessionmaker[AsyncSession], *, lock_timeout: str = LOCK_TIMEOUT
) -> AsyncIterator[AsyncSession]:
    """A session whose database errors come out as the error tree's kinds: a lock wait that ran
    out is ``UpstreamUnavailable`` (reason ``lock_timeout``, detail ``lock_timeout``), anything
    else ``StorageUnavailable``. The driver's message (it may quote SQL) is never passed on."""
    try:
        async with sessions() as session:
            yield session
    except DBAPIError as exc:
        if is_lock_timeout(exc):
            raise UpstreamUnavailable(lock_timeout, retry_after=1, reason="lock_timeout") from None
        raise StorageUnavailable("The database cannot be reached.", reason="database") from None
    except SQLAlchemyError:
        raise StorageUnavailable("The database cannot be reached.", reason="database") from None


def is_lock_timeout(exc: DBAPIError) -> bool:
    """MySQL's lock wait timeout (1205) or NOWAIT/SKIP LOCKED refusal (3572), or SQLite's busy."""
    code = getattr(exc.orig, "args", [None])[0]
    return code in (1205, 3572) or "locked" in str(exc.orig).lower()
