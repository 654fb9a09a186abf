"""Caller key models: the key value appears only in the answer to its creation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, field_validator

from service.kit.schemas import Strict, Text255, Timestamp, no_control_chars, storable

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


Role = Literal["admin", "client"]


class KeyCreate(Strict):
    name: Text255
    role: Role = "client"
    accounts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]] | None
    ) = Field(default=None, max_length=10_000)

    _name = field_validator("name")(no_control_chars)


class KeyPatch(Strict):
    name: Text255 | None = None
    accounts: (
        list[Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]] | None
    ) = Field(default=None, max_length=10_000)

    _name = field_validator("name")(no_control_chars)


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


# Kubernetes names: a namespace is a DNS label, a service account a DNS subdomain.
Namespace = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
AccountName = Annotated[
    str,
    StringConstraints(
        max_length=253, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
    ),
]
Scope = list[Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(storable)]] | None


class ServiceAccountCreate(Strict):
    namespace: Namespace
    name: AccountName
    role: Role = "client"
    accounts: Scope = Field(default=None, max_length=10_000)


class ServiceAccountPatch(Strict):
    role: Role | None = None
    accounts: Scope = Field(default=None, max_length=10_000)


class ServiceAccountOut(BaseModel):
    id: str
    namespace: str
    name: str
    role: Role
    accounts: list[str] | None
    created_at: Timestamp
    last_used_at: Timestamp | None = None


class ServiceAccountList(BaseModel):
    items: list[ServiceAccountOut]
    limit: int
    offset: int
