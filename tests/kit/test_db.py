"""open_session: database errors come out as the error tree's kinds, never the driver's text."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from service.errors import StorageUnavailable, UpstreamUnavailable
from service.kit.db import is_lock_timeout, open_session


async def test_unreachable_database_is_storage_unavailable() -> None:
    """A database that cannot be reached is StorageUnavailable, without the URL or driver text."""
    engine = create_async_engine(
        "mysql+aiomysql://nobody:pw-secret@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    try:
        with pytest.raises(StorageUnavailable) as raised:
            async with open_session(async_sessionmaker(engine)) as session:
                await session.execute(text("SELECT 1"))
        assert raised.value.reason == "database"
        assert "pw-secret" not in str(raised.value)
        assert "127.0.0.1" not in str(raised.value)
    finally:
        await engine.dispose()


async def test_lock_timeout_is_upstream_unavailable_with_the_given_detail() -> None:
    """A lock wait that ran out (SQLite's 'database is locked') is UpstreamUnavailable lock_timeout."""
    engine = create_async_engine("sqlite+aiosqlite://")

    async def locked() -> None:
        async with open_session(async_sessionmaker(engine), lock_timeout="someone holds it") as _session:
            raise OperationalError("UPDATE x", {}, Exception("database is locked"))

    try:
        with pytest.raises(UpstreamUnavailable) as raised:
            await locked()
        assert (raised.value.reason, raised.value.detail) == ("lock_timeout", "someone holds it")
    finally:
        await engine.dispose()


def test_mysql_lock_wait_codes() -> None:
    """MySQL's 1205 (lock wait timeout) and 3572 (NOWAIT) count as lock timeouts; others do not."""
    for code, expected in ((1205, True), (3572, True), (2003, False)):
        exc = OperationalError("SELECT", {}, Exception(code, "message"))
        assert is_lock_timeout(exc) is expected
