"""Credentials beyond the seed's client secret: certificates, federation, rotation, expiry.

The seed table keeps exactly its columns; everything here lives in the broker's own table.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MEDIUMTEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
TIMESTAMP = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")
MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8"}


def upgrade() -> None:
    op.create_table(
        "broker_account_credentials",
        sa.Column("account_id", sa.String(255), nullable=False),
        sa.Column("credential_type", sa.String(16), nullable=False),
        sa.Column("certificate", MEDIUMTEXT, nullable=True),
        sa.Column("certificate_thumbprint", sa.String(64), nullable=True),
        sa.Column("credential_expires_at", TIMESTAMP, nullable=True),
        sa.Column("previous_client_secret", sa.String(255), nullable=True),
        sa.Column("previous_secret_in_use", sa.Boolean(), nullable=False),
        sa.Column("expiry_notified", sa.String(16), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["ms_dynamics_365_data.ID"],
            name="fk_broker_account_credentials_account_id_ms_dynamics_365_data",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("account_id", name="pk_broker_account_credentials"),
        **MYSQL,
    )


def downgrade() -> None:
    op.drop_table("broker_account_credentials")
