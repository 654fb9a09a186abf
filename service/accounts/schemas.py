"""Account request and response models. Secrets are write-only: no response model has a field for them.

Length limits follow the seed's columns: 255 characters for each URL and name, 128 for
``client_secret`` so that its ciphertext fits ``varchar(255)``. URLs are checked against the
outbound policy by the service, which knows the settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StringConstraints, field_validator

from service.kit.schemas import Strict, Text255, Timestamp, Url255, ascii_secret, no_control_chars

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


GrantType = Literal["authorization_code", "client_credentials"]


Status = Literal["ready", "needs_authorization", "invalid_credentials", "failing"]


Secret128 = Annotated[str, StringConstraints(min_length=1, max_length=128)]


RefreshToken = Annotated[str, StringConstraints(min_length=1, max_length=16_384)]


CredentialType = Literal["client_secret", "certificate", "federated"]


def _pem_text(value: str | None) -> str | None:
    if value is not None and (not value.isascii() or "-----BEGIN" not in value):
        raise ValueError("must be PEM text: the private key and its certificate (-----BEGIN ...)")
    return value


# One PEM with the private key and its X.509 certificate (and optionally its chain).
CertificatePem = Annotated[str, StringConstraints(min_length=1, max_length=32_768), AfterValidator(_pem_text)]


def _certificate_field() -> Any:
    return Field(
        default=None,
        repr=False,  # a private key never in a repr (tracebacks, logs)
        description="Write-only: one PEM with the unencrypted private key (PKCS#8 or PKCS#1) and its "
        "X.509 certificate",
    )


def _expires_field() -> Any:
    # When an admin says the secret expires (Azure's "Expires" column); naive means UTC.
    return Field(default=None, description="When the client secret expires (RFC 3339)")


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
    credential_type: CredentialType = "client_secret"
    certificate: CertificatePem | None = _certificate_field()
    client_secret_expires_at: Timestamp | None = _expires_field()

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
    credential_type: CredentialType | None = None
    certificate: CertificatePem | None = _certificate_field()
    client_secret_expires_at: Timestamp | None = _expires_field()

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
    credential_type: CredentialType = "client_secret"
    has_client_secret: bool
    has_previous_client_secret: bool = False
    certificate_thumbprint: str | None = Field(
        default=None, description="The certificate's x5t#S256: base64url SHA-256 of its DER encoding"
    )
    client_secret_expires_at: Timestamp | None = None
    credential_expires_at: Timestamp | None = Field(
        default=None,
        description="When the credential expires: the secret's date or the certificate's notAfter",
    )
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
