"""Shared fixtures: a migrated database (SQLite, and MariaDB when available), the app in its
lifespan, an httpx client on the ASGI transport, and a strict respx router for Azure AD.

MySQL-backed tests read ``BROKER_TEST_MYSQL_URL`` (``.ci/run`` sets it). Without it they skip
with the reason on a laptop, and fail under ``CI=true``: CI must never silently skip them.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from service import migrate
from service.app import create_app, wrap
from service.settings import Settings
from tests.helpers import (  # noqa: F401 -- re-exported: tests import them from here
    ADMIN_KEY,
    API_URL,
    AUTHORIZE_URL_V1,
    AUTHORIZE_URL_V2,
    CLIENT_KEY,
    CLIENT_SECRET,
    ENCRYPTION_KEY,
    REFRESH_TOKEN,
    TENANT,
    TOKEN_URL_V1,
    TOKEN_URL_V2,
    account_body,
    admin,
    client,
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(condition: bool, reason: str) -> None:
    """Skip on a laptop, fail in CI."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


async def _mysql_reachable(url: str) -> bool:
    engine = create_async_engine(url)
    try:
        async with engine.connect():
            return True
    except Exception:
        return False
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def mysql_server_url() -> str | None:
    return os.environ.get("BROKER_TEST_MYSQL_URL")


@pytest.fixture
async def mysql_url(mysql_server_url: str | None) -> AsyncIterator[str]:
    """A fresh, empty MariaDB database for one test, dropped afterwards."""
    require(bool(mysql_server_url), "BROKER_TEST_MYSQL_URL is not set (MariaDB tests)")
    assert mysql_server_url
    require(await _mysql_reachable(mysql_server_url), f"MariaDB at {make_url(mysql_server_url).host} is down")
    name = f"tb_{uuid.uuid4().hex[:12]}"
    admin_engine = create_async_engine(mysql_server_url, isolation_level="AUTOCOMMIT")
    async with admin_engine.connect() as conn:
        await conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4")
    try:
        yield make_url(mysql_server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        async with admin_engine.connect() as conn:
            await conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        await admin_engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
async def mysql_settings(mysql_url: str, tmp_path: Path) -> Settings:
    """Settings over a fresh, migrated MariaDB database (for tests of MariaDB alone)."""
    await migrate.upgrade(mysql_url)
    return make_settings(mysql_url, tmp_path)


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on SQLite and on MariaDB."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"
    url: str = request.getfixturevalue("mysql_url")
    return url


def make_settings(database_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "encryption_keys": ENCRYPTION_KEY,
        "admin_keys": ADMIN_KEY,
        "client_keys": CLIENT_KEY,
        "var_dir": tmp_path / "var",
        "backoff_base_seconds": 0.0,
        "backoff_max_seconds": 0.0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def settings(database_url: str, tmp_path: Path) -> Settings:
    await migrate.upgrade(database_url)
    return make_settings(database_url, tmp_path)


class Running:
    """The app inside its lifespan, with a client that goes through the fast path."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = create_app(settings)
        self.asgi = wrap(self.app, settings)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.asgi), base_url="http://broker.test"
        )

    @property
    def ctx(self) -> Any:
        return self.app.state.ctx


@contextlib.contextmanager
def sql_statements(running: Running) -> Iterator[list[str]]:
    """The SQL statements the app runs inside the block, in order."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    engine = running.ctx.engine.sync_engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


@pytest.fixture
def run_app() -> Callable[[Settings], Any]:
    """An async context manager factory: ``async with run_app(settings) as running: ...``."""
    import contextlib

    @contextlib.asynccontextmanager
    async def _run(settings: Settings) -> AsyncIterator[Running]:
        running = Running(settings)
        async with running.app.router.lifespan_context(running.app), running.client:
            yield running

    return _run


@pytest.fixture
async def running(settings: Settings, run_app: Callable[[Settings], Any]) -> AsyncIterator[Running]:
    async with run_app(settings) as r:
        yield r


@pytest.fixture
def azure() -> Iterator[respx.MockRouter]:
    """Azure AD at the HTTP edge: unmatched requests fail the test."""
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


def v1_token(access: str = "at-1", refresh: str | None = "rt-2", expires_in: int = 3599) -> dict[str, Any]:
    body: dict[str, Any] = {
        "token_type": "Bearer",
        "scope": "user_impersonation",
        "expires_in": str(expires_in),
        "ext_expires_in": str(expires_in),
        "expires_on": "1548192804",
        "not_before": "1548188904",
        "resource": "https://contoso.crm.dynamics.com",
        "access_token": access,
    }
    if refresh:
        body["refresh_token"] = refresh
    return body
