"""``GET /accounts/{id}/token``: the waiting path. Cache hits are answered by ``fastpath.py``."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.deps import AccountId, Caller, Ctx
from service.errors import AccountNotFound, BrokerError, NotFound
from service.keys.store import Principal
from service.kit.http import NO_STORE
from service.kit.schemas import Problem
from service.tokens.broker import TokenBroker
from service.tokens.response import CachedToken
from service.tokens.schemas import TokenOut

router = APIRouter(tags=["tokens"])


@router.get(
    "/accounts/{account_id}/token",
    response_model=TokenOut,
    summary="Get a valid access token for an account",
    description=(
        "`account_id` may be `default`. Served from memory while the token has more than the refresh "
        "margin left; otherwise the caller waits for the one refresh in flight. `min_ttl` asks for at "
        "least that many seconds of validity: the broker refreshes for it (at most once per "
        "BROKER_FORCED_REFRESH_INTERVAL_SECONDS per account) and returns the fresh token even if "
        "Azure's lifetime is shorter."
    ),
    responses={
        401: {"model": Problem, "description": "Missing or invalid API key"},
        404: {"model": Problem, "description": "account_not_found (or outside the key's scope)"},
        409: {
            "model": Problem,
            "description": "needs_authorization or invalid_credentials: a person must act",
        },
        503: {"model": Problem, "description": "upstream_unavailable: retry after Retry-After seconds"},
    },
)
async def get_token(
    account_id: AccountId,
    ctx: Ctx,
    caller: Caller,
    min_ttl: Annotated[int, Query(ge=0, le=3600, description="Seconds of validity required")] = 0,
) -> Response:
    broker = ctx.broker
    try:
        # One bound for the whole wait, the look-ups included (get_token bounds its own part).
        async with asyncio.timeout(ctx.settings.max_wait_seconds):
            entry = await _token(broker, caller, account_id, min_ttl)
    except TimeoutError:
        exc = broker.too_slow()
        ctx.metrics.tokens[exc.code] = ctx.metrics.tokens.get(exc.code, 0) + 1
        raise exc from None
    except BrokerError as exc:
        outcome = "not_found" if isinstance(exc, NotFound) else exc.code
        ctx.metrics.tokens[outcome] = ctx.metrics.tokens.get(outcome, 0) + 1
        raise
    return Response(entry.body(broker.now()), media_type="application/json", headers=NO_STORE)


async def _token(broker: TokenBroker, caller: Principal, account_id: str, min_ttl: int) -> CachedToken:
    if account_id == "default":
        try:
            account_id = await broker.resolve(account_id)
        except AccountNotFound:
            await broker.exists(account_id)  # as many look-ups as a default outside the key's scope
            raise
    if not caller.may_use(account_id):
        # Answer exactly as for a missing account, after the same database look-up.
        await broker.exists(account_id)
        raise AccountNotFound(account_id)
    return await broker.get_token(account_id, min_ttl=min_ttl)
