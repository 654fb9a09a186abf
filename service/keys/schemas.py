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
