"""The seed table and the broker's own tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT20 = sa.BigInteger().with_variant(mysql.BIGINT(display_width=20), "mysql")
TINYINT1 = sa.Boolean(create_constraint=False).with_variant(mysql.TINYINT(display_width=1), "mysql")
LONGTEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql")
MEDIUMTEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
SEED = "ms_dynamics_365_data"
EPOCH = datetime(1970, 1, 1)
# Foreign keys to the seed table need its character set (utf8, as the integration guide has it).
MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8"}


def upgrade() -> None:
    # Exactly the integration guide's DDL: names, MySQL types, nullability, engine and charset.
    op.create_table(
        SEED,
        sa.Column("ID", sa.String(255), nullable=False),
        sa.Column("VERSION", BIGINT20, nullable=True),
        sa.Column("DEFAULT_ACCOUNT", TINYINT1, nullable=False, server_default=sa.text("'0'")),
        sa.Column("TENANT_ID", sa.String(255), nullable=False),
        sa.Column("NAME", sa.String(255), nullable=False),
        sa.Column("CLIENT_ID", sa.String(255), nullable=False),
        sa.Column("CLIENT_SECRET", sa.String(255), nullable=True),
        sa.Column("REFRESH_TOKEN", LONGTEXT, nullable=False),
        sa.Column("AUTHORIZATION_URL", sa.String(255), nullable=False),
        sa.Column("TOKEN_URL", sa.String(255), nullable=False),
        sa.Column("API_URL", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("ID", name="pk_ms_dynamics_365_data"),
        mysql_engine="InnoDB",
        mysql_charset="utf8",
    )
    op.create_index("uq_ms_dynamics_365_data_NAME", SEED, ["NAME"], unique=True)

    op.create_table(
        "broker_account_state",
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("grant_type", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("access_token", MEDIUMTEXT, nullable=True),
        sa.Column("token_expires_at", TIMESTAMP, nullable=True),
        sa.Column("last_refreshed_at", TIMESTAMP, nullable=True),
        sa.Column("last_error_code", sa.String(64), nullable=True),
        sa.Column("last_error_message", sa.String(1024), nullable=True),
        sa.Column("last_error_at", TIMESTAMP, nullable=True),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            [f"{SEED}.ID"],
            name="fk_broker_account_state_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name="pk_broker_account_state"),
        **MYSQL,
    )
    op.create_table(
        "broker_pending_authorizations",
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("redirect_uri", sa.String(1024), nullable=False),
        sa.Column("code_verifier", sa.String(255), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            [f"{SEED}.ID"],
            name="fk_broker_pending_authorizations_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("state_hash", name="pk_broker_pending_authorizations"),
        **MYSQL,
    )
    op.create_index(
        "ix_broker_pending_authorizations_account_id", "broker_pending_authorizations", ["account_id"]
    )
    op.create_table(
        "broker_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("account_id", sa.String(255), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_broker_events"),
        **MYSQL,
    )
    op.create_index("ix_broker_events_account_id_id", "broker_events", ["account_id", "id"])
    op.create_table(
        "broker_api_keys",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("scoped", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_broker_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_broker_api_keys_key_hash"),
        **MYSQL,
    )
    op.create_table(
        "broker_api_key_scopes",
        sa.Column("key_id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["broker_api_keys.id"],
            name="fk_broker_api_key_scopes_key_id_broker_api_keys",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            [f"{SEED}.ID"],
            name="fk_broker_api_key_scopes_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", "account_id", name="pk_broker_api_key_scopes"),
        **MYSQL,
    )
    leases = op.create_table(
        "broker_leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_broker_leases"),
        **MYSQL,
    )
    # The row that transactions changing the default account lock first, so two concurrent
    # "make me the default" requests take turns instead of both winning.
    op.bulk_insert(leases, [{"name": "mutex:default_account", "holder": "", "expires_at": EPOCH}])


def downgrade() -> None:
    op.drop_table("broker_leases")
    op.drop_table("broker_api_key_scopes")
    op.drop_table("broker_api_keys")
    # Dropping a table drops its indexes; dropping an index first fails on MySQL when a foreign
    # key needs it.
    op.drop_table("broker_events")
    op.drop_table("broker_pending_authorizations")
    op.drop_table("broker_account_state")
    op.drop_table(SEED)
