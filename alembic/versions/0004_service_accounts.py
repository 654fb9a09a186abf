"""Kubernetes service-account callers: bindings and their scopes.

Revision ID: 0004
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
SEED = "ms_dynamics_365_data"
# Foreign keys to the seed table need its character set (utf8, as the integration guide has it).
MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8"}


def upgrade() -> None:
    op.create_table(
        "broker_service_accounts",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("namespace", sa.String(63), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("scoped", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_broker_service_accounts"),
        sa.UniqueConstraint("namespace", "name", name="uq_broker_service_accounts_namespace_name"),
        **MYSQL,
    )
    op.create_table(
        "broker_sa_scopes",
        sa.Column("binding_id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(
            ["binding_id"],
            ["broker_service_accounts.id"],
            name="fk_broker_sa_scopes_binding_id_broker_service_accounts",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            [f"{SEED}.ID"],
            name="fk_broker_sa_scopes_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("binding_id", "account_id", name="pk_broker_sa_scopes"),
        **MYSQL,
    )


def downgrade() -> None:
    op.drop_table("broker_sa_scopes")
    op.drop_table("broker_service_accounts")
