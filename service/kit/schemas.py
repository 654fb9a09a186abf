"""Pieces every request and response model shares: strict input (unknown fields are 422),
RFC 3339 timestamps, what the seed's utf8 columns can hold, and the problem+json body.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


Timestamp = Annotated[datetime, AfterValidator(lambda v: v if v.tzinfo else v.replace(tzinfo=UTC))]


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


def no_control_chars(value: str | None) -> str | None:
    if value is not None and any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ValueError("must not contain control characters")
    return storable(value) if value is not None else None


def ascii_secret(value: str | None) -> str | None:
    # 128 characters must mean at most 128 bytes, or the ciphertext would overflow the column.
    if value is not None and (not value.isascii() or not value.isprintable()):
        raise ValueError("must be printable ASCII (Azure AD client secrets are)")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
