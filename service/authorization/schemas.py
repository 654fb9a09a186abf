"""Authorization request and response models."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, StringConstraints

from service.kit.schemas import Strict, Timestamp

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


class AuthorizeIn(Strict):
    redirect_uri: (
        Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1024)] | None
    ) = None


class AuthorizeOut(BaseModel):
    authorization_url: str
    state: str
    expires_at: Timestamp


class AuthorizationCodeIn(Strict):
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
