"""Request and response models. Secrets are write-only: no response model has a field for them.

Unknown fields are refused (422). Length limits follow the seed's columns: 255 characters for
each URL and name, 128 for ``client_secret`` so that its ciphertext fits ``varchar(255)``.
URLs are checked against the outbound policy by ``accounts.py``, which knows the settings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").
Timestamp = Annotated[datetime, AfterValidator(lambda v: v if v.tzinfo else v.replace(tzinfo=UTC))]

GrantType = Literal["authorization_code", "client_credentials"]
Status = Literal["ready", "needs_authorization", "invalid_credentials", "failing"]
Role = Literal["admin", "client"]


def storable(value: str) -> str:
    """Refuse what the seed table's ``utf8`` (3-byte) columns cannot hold, on every database alike."""
    if any(ord(ch) > 0xFFFF for ch in value):
        raise ValueError("must not contain characters outside the Basic Multilingual Plane (such as emoji)")
    return value


Text255 = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255), AfterValidator(storable)
]
Url255 = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255), AfterValidator(storable)
]
AccountRef = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]
Secret128 = Annotated[str, StringConstraints(min_length=1, max_length=128)]
RefreshToken = Annotated[str, StringConstraints(min_length=1, max_length=16_384)]


def _no_control_chars(value: str | None) -> str | None:
    if value is not None and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain control characters")
    return storable(value) if value is not None else None


def _ascii_secret(value: str | None) -> str | None:
    # 128 characters must mean at most 128 bytes, or the ciphertext would overflow the column.
    if value is not None and (not value.isascii() or not value.isprintable()):
        raise ValueError("must be printable ASCII (Azure AD client secrets are)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccountCreate(_Strict):
    name: Text255
    default_account: bool = False
    tenant_id: Text255
    client_id: Text255
    client_secret: Secret128 | None = None
    refresh_token: RefreshToken | None = None
    authorization_url: Url255
    token_url: Url255
    api_url: Url255
    grant_type: GrantType = "authorization_code"

    _text = field_validator("name", "tenant_id", "client_id", "refresh_token")(_no_control_chars)
    _secret = field_validator("client_secret")(_ascii_secret)


class AccountPatch(_Strict):
    """Only the fields sent change. ``client_secret`` and ``refresh_token`` may be null to clear."""

    name: Text255 | None = None
    default_account: bool | None = None
    tenant_id: Text255 | None = None
    client_id: Text255 | None = None
    client_secret: Secret128 | None = None
    refresh_token: RefreshToken | None = None
    authorization_url: Url255 | None = None
    token_url: Url255 | None = None
    api_url: Url255 | None = None
    grant_type: GrantType | None = None

    _text = field_validator("name", "tenant_id", "client_id", "refresh_token")(_no_control_chars)
    _secret = field_validator("client_secret")(_ascii_secret)

    def changes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.model_fields_set}


class LastError(BaseModel):
    code: str
    message: str | None = None
    at: Timestamp | None = None


class AccountOut(BaseModel):
    id: str
    version: int
    name: str
    default_account: bool
    tenant_id: str
    client_id: str
    authorization_url: str
    token_url: str
    api_url: str
    grant_type: GrantType
    has_client_secret: bool
    has_refresh_token: bool
    status: Status
    token_expires_at: Timestamp | None = None
    last_refreshed_at: Timestamp | None = None
    last_error: LastError | None = None


class AccountList(BaseModel):
    items: list[AccountOut]
    limit: int
    offset: int


class TokenOut(BaseModel):
    access_token: str
    token_type: Literal["Bearer"] = "Bearer"  # noqa: S105 - the OAuth token type, not a secret
    expires_in: int = Field(description="Seconds the token is still valid")
    refresh_in: int = Field(
        description=(
            "Seconds until the broker would refresh this token (0 once a refresh is due): a caller "
            "may keep the token in memory this long and should ask again after it"
        )
    )
    expires_at: Timestamp
    api_url: str
    account_id: str


class AuthorizeIn(_Strict):
    redirect_uri: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)] | None
    ) = None


class AuthorizeOut(BaseModel):
    authorization_url: str
    state: str
    expires_at: Timestamp


class AuthorizationCodeIn(_Strict):
    code: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8_192)]
    redirect_uri: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)] | None
    ) = None


class ConnectionTestOut(BaseModel):
    ok: bool
    user_id: str | None = None
    organization_id: str | None = None
    business_unit_id: str | None = None
    latency_ms: float | None = None
    reason: str | None = None
    message: str | None = None
    next_step: str | None = None


class EventOut(BaseModel):
    id: int
    account_id: str | None
    kind: str
    actor: str | None
    detail: dict[str, Any] | None
    created_at: Timestamp


class EventList(BaseModel):
    items: list[EventOut]
    limit: int
    offset: int


class KeyCreate(_Strict):
    name: Text255
    role: Role = "client"
    accounts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]] | None
    ) = Field(default=None, max_length=10_000)


class KeyPatch(_Strict):
    name: Text255 | None = None
    accounts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]] | None
    ) = Field(default=None, max_length=10_000)


class KeyOut(BaseModel):
    id: str
    name: str
    role: Role
    accounts: list[str] | None
    prefix: str
    created_at: Timestamp
    last_used_at: Timestamp | None = None


class KeyCreated(KeyOut):
    key: str = Field(description="The key itself: shown only in this response")


class KeyList(BaseModel):
    items: list[KeyOut]
    limit: int
    offset: int


class Problem(BaseModel):
    """RFC 9457 problem details."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    code: str
    instance: str | None = None
    errors: list[dict[str, Any]] | None = Field(default=None, description="Per-field problems (422)")
    reason: str | None = Field(default=None, description="Why a 503 happened")
    retry_after: int | None = Field(default=None, description="Seconds to wait (503)")
