"""Migrations: upgrade and downgrade on both databases, models in step, the seed table exact."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service import migrate
from service.models import Base

# The integration guide's DDL, as information_schema.COLUMNS reports it on MariaDB:
# (name, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT).
SEED_COLUMNS = [
    ("ID", "varchar(255)", "NO", None),
    ("VERSION", "bigint(20)", "YES", "NULL"),
    ("DEFAULT_ACCOUNT", "tinyint(1)", "NO", "0"),
    ("TENANT_ID", "varchar(255)", "NO", None),
    ("NAME", "varchar(255)", "NO", None),
    ("CLIENT_ID", "varchar(255)", "NO", None),
    ("CLIENT_SECRET", "varchar(255)", "YES", "NULL"),
    ("REFRESH_TOKEN", "longtext", "NO", None),
    ("AUTHORIZATION_URL", "varchar(255)", "NO", None),
    ("TOKEN_URL", "varchar(255)", "NO", None),
    ("API_URL", "varchar(255)", "NO", None),
]


def _diff(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_upgrade_matches_models_and_downgrade_removes_everything(database_url: str) -> None:
    """After upgrade the schema equals the models; downgrade to base drops every table."""
    await migrate.upgrade(database_url)
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
            assert {"ms_dynamics_365_data", "broker_account_state", "broker_events"} <= await conn.run_sync(
                _tables
            )
        assert await migrate.current_revision(engine) == migrate.head_revision()
        await migrate.downgrade(database_url, "base")
        async with engine.connect() as conn:
            assert await conn.run_sync(_tables) <= {"alembic_version"}
        await migrate.upgrade(database_url)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_seed_table_is_exactly_the_guide_ddl_on_mariadb(mysql_url: str) -> None:
    """information_schema.COLUMNS of ms_dynamics_365_data equals the integration guide's DDL."""
    await migrate.upgrade(mysql_url)
    engine = create_async_engine(mysql_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.exec_driver_sql(
                "SELECT COLUMN_NAME, COLUMN_TYPE, IS_NULLABLE, COLUMN_DEFAULT "
                "FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE() "
                "AND TABLE_NAME = 'ms_dynamics_365_data' ORDER BY ORDINAL_POSITION"
            )
            columns = [tuple(r) for r in rows]
            table = (
                await conn.exec_driver_sql(
                    "SELECT ENGINE, TABLE_COLLATION FROM information_schema.TABLES "
                    "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ms_dynamics_365_data'"
                )
            ).one()
            keys = await conn.exec_driver_sql(
                "SELECT INDEX_NAME, COLUMN_NAME, NON_UNIQUE FROM information_schema.STATISTICS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ms_dynamics_365_data'"
            )
            indexes = {(r[0], r[1], int(r[2])) for r in keys}
    finally:
        await engine.dispose()
    normalized = [
        (n, t, nullable, d.strip("'") if isinstance(d, str) else d) for n, t, nullable, d in columns
    ]
    assert normalized == SEED_COLUMNS
    assert table[0] == "InnoDB"
    assert table[1].startswith("utf8")
    assert ("PRIMARY", "ID", 0) in indexes
    assert ("uq_ms_dynamics_365_data_NAME", "NAME", 0) in indexes


async def test_app_refuses_to_start_when_schema_is_behind(
    database_url: str, tmp_path: Any, run_app: Any
) -> None:
    """Start-up fails with a message naming `token-broker migrate` when the schema is not at head."""
    import pytest

    from service.errors import ConfigurationError
    from tests.conftest import make_settings

    settings = make_settings(database_url, tmp_path)
    with pytest.raises(ConfigurationError, match="token-broker migrate"):
        async with run_app(settings):
            pass
