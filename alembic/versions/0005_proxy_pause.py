"""The proxy's per-account pauses, shared by the replicas.

Revision ID: 0005
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")


def upgrade() -> None:
    op.create_table(
        "broker_proxy_pause",
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("until", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["ms_dynamics_365_data.ID"],
            name="fk_broker_proxy_pause_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name="pk_broker_proxy_pause"),
        mysql_engine="InnoDB",
        mysql_charset="utf8",
    )
    op.create_index("ix_broker_proxy_pause_until", "broker_proxy_pause", ["until"])


def downgrade() -> None:
    op.drop_index("ix_broker_proxy_pause_until", table_name="broker_proxy_pause")
    op.drop_table("broker_proxy_pause")
