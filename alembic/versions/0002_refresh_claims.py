"""Refresh claims: who is refreshing an account's token, and until when.

A replica claims an account's refresh in a short transaction (owner, claim id, expiry on the
token row) and calls Azure with no connection held; see service/tokens/refresh.py.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")


def upgrade() -> None:
    with op.batch_alter_table("broker_account_state") as table:
        table.add_column(sa.Column("refresh_claim_owner", sa.String(64), nullable=True))
        table.add_column(sa.Column("refresh_claim_id", sa.String(32), nullable=True))
        table.add_column(sa.Column("refresh_claim_expires_at", TIMESTAMP, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("broker_account_state") as table:
        table.drop_column("refresh_claim_expires_at")
        table.drop_column("refresh_claim_id")
        table.drop_column("refresh_claim_owner")
