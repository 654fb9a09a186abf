"""The token response as OpenAPI describes it (the bytes are built by ``response.py``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.kit.schemas import Timestamp

# The database keeps naive UTC; responses carry RFC 3339 with the offset ("...Z").


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
