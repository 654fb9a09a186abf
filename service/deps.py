"""Dependencies shared by the routers, defined once as ``Annotated`` aliases."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.context import Context
from service.errors import Forbidden, Unauthorized
from service.keys.store import Principal

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An admin or client API key, or a Kubernetes service-account token of a bound service "
    "account, sent as `Authorization: Bearer <key or token>`.",
)


def get_context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


async def get_principal(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Principal:
    if credentials is None or not credentials.credentials:
        raise Unauthorized()
    # Set by the token fast path when it already looked this request's key up.
    found: Principal | None = getattr(request.state, "principal", None)
    if found is not None:
        return found
    found = await get_context(request).keys.resolve(credentials.credentials)
    if found is None:
        raise Unauthorized("The API key is not valid (or has been revoked).")
    request.state.principal = found
    return found


def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("This operation needs an admin API key.")
    return principal


Ctx = Annotated[Context, Depends(get_context)]
Caller = Annotated[Principal, Depends(get_principal)]
Admin = Annotated[Principal, Depends(get_admin)]
# An id the tables cannot hold (too long, 4-byte characters) is simply not found: see repository.
AccountId = Annotated[str, Path(description="Account id, or `default`")]
KeyId = Annotated[str, Path(description="Key id")]
ServiceAccountId = Annotated[str, Path(description="Service-account binding id")]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size (at most 500)")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Items to skip")]
