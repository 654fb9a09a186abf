"""Account request and response models. Secrets are write-only: no response model has a field for them.

Length limits follow the seed's columns: 255 characters for each URL and name, 128 for
``client_secret`` so that its ciphertext fits ``varchar(255)``. URLs are checked against the
outbound policy by the service, which knows the settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, StrictBool, StringConstraints, field_validator

from service.kit.schemas import Strict, Text255, Timestamp, Url255, ascii_secret, no_control_chars

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


GrantType = Literal["authorization_code", "client_credentials"]


Status = Literal["ready", "needs_authorization", "invalid_credentials", "failing"]


Secret128 = Annotated[str, StringConstraints(min_length=1, max_length=128)]


RefreshToken = Annotated[str, StringConstraints(min_length=1, max_length=16_384)]


class AccountCreate(Strict):
    name: Text255
    # Strict: "yes", 1 or "true" are 422, not silently true (issue 12).
    default_account: StrictBool = False
    tenant_id: Text255
    client_id: Text255
    client_secret: Secret128 | None = None
    refresh_token: RefreshToken | None = None
    authorization_url: Url255
    token_url: Url255
    api_url: Url255
    grant_type: GrantType = "authorization_code"

    _text = field_validator("name", "tenant_id", "client_id", "refresh_token")(no_control_chars)
    _secret = field_validator("client_secret")(ascii_secret)


class AccountPatch(Strict):
    """Only the fields sent change. ``client_secret`` and ``refresh_token`` may be null to clear."""

    name: Text255 | None = None
    default_account: StrictBool | None = None
    tenant_id: Text255 | None = None
    client_id: Text255 | None = None
    client_secret: Secret128 | None = None
    refresh_token: RefreshToken | None = None
    authorization_url: Url255 | None = None
    token_url: Url255 | None = None
    api_url: Url255 | None = None
    grant_type: GrantType | None = None

    _text = field_validator("name", "tenant_id", "client_id", "refresh_token")(no_control_chars)
    _secret = field_validator("client_secret")(ascii_secret)

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
