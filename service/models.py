"""The tables: the seed's ``ms_dynamics_365_data`` column for column, and the broker's own.

``ms_dynamics_365_data`` keeps the integration guide's exact names, MySQL types and nullability so
an existing configuration database can be pointed at the broker. ``CLIENT_SECRET`` and
``REFRESH_TOKEN`` hold ciphertext (``crypto.py``); ``REFRESH_TOKEN`` is '' before authorization.
Everything else the broker needs lives in ``broker_*`` tables created by alembic beside it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.accounts.status import Status

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Seed types: MySQL spells them exactly; SQLite gets the generic equivalent.
BIGINT20 = BigInteger().with_variant(mysql.BIGINT(display_width=20), "mysql")
TINYINT1 = Boolean(create_constraint=False).with_variant(mysql.TINYINT(display_width=1), "mysql")
LONGTEXT = Text().with_variant(mysql.LONGTEXT(), "mysql")
MEDIUMTEXT = Text().with_variant(mysql.MEDIUMTEXT(), "mysql")
# Microsecond precision on MySQL, so "newer than" comparisons are exact.
TIMESTAMP = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# Foreign keys to the seed table need its character set (utf8, as the integration guide has it).
MYSQL_TABLE = {"mysql_engine": "InnoDB", "mysql_charset": "utf8"}


class Account(Base):
    """One row of the seed table: an integration account."""

    __tablename__ = "ms_dynamics_365_data"
    __table_args__ = (
        Index("uq_ms_dynamics_365_data_NAME", "NAME", unique=True),
        {"mysql_engine": "InnoDB", "mysql_charset": "utf8"},
    )

    id: Mapped[str] = mapped_column("ID", String(255), primary_key=True)
    version: Mapped[int | None] = mapped_column("VERSION", BIGINT20, nullable=True)
    default_account: Mapped[bool] = mapped_column(
        "DEFAULT_ACCOUNT", TINYINT1, nullable=False, server_default=text("'0'")
    )
    tenant_id: Mapped[str] = mapped_column("TENANT_ID", String(255), nullable=False)
    name: Mapped[str] = mapped_column("NAME", String(255), nullable=False)
    client_id: Mapped[str] = mapped_column("CLIENT_ID", String(255), nullable=False)
    client_secret: Mapped[str | None] = mapped_column("CLIENT_SECRET", String(255), nullable=True)
    refresh_token: Mapped[str] = mapped_column("REFRESH_TOKEN", LONGTEXT, nullable=False)
    authorization_url: Mapped[str] = mapped_column("AUTHORIZATION_URL", String(255), nullable=False)
    token_url: Mapped[str] = mapped_column("TOKEN_URL", String(255), nullable=False)
    api_url: Mapped[str] = mapped_column("API_URL", String(255), nullable=False)
    # Loaded with the row (one LEFT JOIN, no extra statement): what the account authenticates with
    # beyond the seed's CLIENT_SECRET. None for a row written by someone else: a client secret.
    credential: Mapped[AccountCredential | None] = relationship(lazy="joined", uselist=False, viewonly=True)


class AccountState(Base):
    """The broker's side of an account: grant type, status and the cached access token.

    A refresh claims this row in a short transaction (``SELECT ... FOR UPDATE``, then the claim
    columns) so replicas take turns without holding a lock while Azure answers.
    """

    __tablename__ = "broker_account_state"
    __table_args__ = MYSQL_TABLE

    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), primary_key=True
    )
    grant_type: Mapped[str] = mapped_column(String(32), nullable=False, default="authorization_code")
    status: Mapped[str] = mapped_column(String(32), nullable=False, default=Status.NEEDS_AUTHORIZATION.value)
    access_token: Mapped[str | None] = mapped_column(MEDIUMTEXT, nullable=True)
    token_expires_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)
    last_refreshed_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)
    last_error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error_message: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    last_error_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)
    next_attempt_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    # The refresh claim (service/tokens/refresh.py): the replica calling Azure for this account,
    # the claim's id (a replica's later claim is another), and when another replica may take it.
    refresh_claim_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    refresh_claim_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    refresh_claim_expires_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)


class AccountCredential(Base):
    """How an account authenticates to Azure AD when it is more than the seed's client secret.

    ``certificate`` and ``previous_client_secret`` hold ciphertext sealed to this row and column
    (``kit/sealing.py``); the thumbprint and expiry are public facts about the certificate or
    secret. ``expiry_notified`` is the last expiry notice sent for ``credential_expires_at``.
    """

    __tablename__ = "broker_account_credentials"
    __table_args__ = MYSQL_TABLE

    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), primary_key=True
    )
    credential_type: Mapped[str] = mapped_column(String(16), nullable=False, default="client_secret")
    certificate: Mapped[str | None] = mapped_column(MEDIUMTEXT, nullable=True)
    certificate_thumbprint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    credential_expires_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)
    previous_client_secret: Mapped[str | None] = mapped_column(String(255), nullable=True)
    previous_secret_in_use: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    expiry_notified: Mapped[str | None] = mapped_column(String(16), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)


class PendingAuthorization(Base):
    """An authorization started by ``POST /accounts/{id}/authorize``: single-use, short-lived."""

    __tablename__ = "broker_pending_authorizations"
    __table_args__ = MYSQL_TABLE

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), nullable=False, index=True
    )
    redirect_uri: Mapped[str] = mapped_column(String(1024), nullable=False)
    code_verifier: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)


class Event(Base):
    """An account's history. No foreign key: a deleted account's history stays readable."""

    __tablename__ = "broker_events"
    __table_args__ = (Index("ix_broker_events_account_id_id", "account_id", "id"), MYSQL_TABLE)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    account_id: Mapped[str | None] = mapped_column(String(255), nullable=True)
    kind: Mapped[str] = mapped_column(String(64), nullable=False)
    actor: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)


class ApiKey(Base):
    """A caller key managed through the API; only its SHA-256 hash is stored."""

    __tablename__ = "broker_api_keys"
    __table_args__ = MYSQL_TABLE

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    prefix: Mapped[str] = mapped_column(String(16), nullable=False)
    scoped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)


class ApiKeyScope(Base):
    """One account a scoped key may use; deleting the account removes it from every scope."""

    __tablename__ = "broker_api_key_scopes"
    __table_args__ = MYSQL_TABLE

    key_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("broker_api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), primary_key=True
    )


class Lease(Base):
    """A named, expiring lease so that one replica at a time runs a periodic job."""

    __tablename__ = "broker_leases"
    __table_args__ = MYSQL_TABLE

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)


class ServiceAccount(Base):
    """A Kubernetes service account allowed to call, with a caller role (and scope) like a key."""

    __tablename__ = "broker_service_accounts"
    __table_args__ = (
        UniqueConstraint("namespace", "name", name="uq_broker_service_accounts_namespace_name"),
        MYSQL_TABLE,
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(63), nullable=False)
    name: Mapped[str] = mapped_column(String(253), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    scoped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
    last_used_at: Mapped[datetime | None] = mapped_column(TIMESTAMP, nullable=True)


class ServiceAccountScope(Base):
    """One account a scoped service account may use; deleting the account removes it."""

    __tablename__ = "broker_sa_scopes"
    __table_args__ = MYSQL_TABLE

    binding_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("broker_service_accounts.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), primary_key=True
    )


class ProxyPause(Base):
    """An account the proxy sends nothing for until ``until``: upstream answered 429 or 503 with
    Retry-After. Every replica reads these, so one replica's throttling pauses them all."""

    __tablename__ = "broker_proxy_pause"
    __table_args__ = (Index("ix_broker_proxy_pause_until", "until"), MYSQL_TABLE)

    account_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("ms_dynamics_365_data.ID", ondelete="CASCADE"), primary_key=True
    )
    until: Mapped[datetime] = mapped_column(TIMESTAMP, nullable=False)
