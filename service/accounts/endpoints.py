"""Account management: thin handlers over ``AccountService``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from service.accounts.schemas import AccountCreate, AccountList, AccountOut, AccountPatch, EventList
from service.deps import AccountId, Admin, Ctx, Limit, Offset
from service.errors import InvalidInput
from service.kit.schemas import Problem

router = APIRouter(prefix="/accounts", tags=["accounts"])

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    403: {"model": Problem, "description": "The key may not do this"},
    422: {"model": Problem, "description": "Invalid input"},
}


def _etag(account: AccountOut) -> str:
    return f'"{account.version}"'


def _parse_if_match(value: str | None) -> int | None:
    if value is None or value.strip() == "*":
        return None
    text = value.strip()
    text = text.removeprefix("W/").strip('"')
    # str.isdigit() also accepts '²' and other digits int() refuses: only ASCII ones are a version.
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise InvalidInput(
            'If-Match must be an ETag from GET /accounts/{id}, such as "3".',
            [{"loc": ["header", "If-Match"], "msg": "not an account ETag", "type": "etag"}],
        )
    return int(text)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=AccountOut,
    responses={**ERRORS, 409: {"model": Problem, "description": "name_conflict"}},
    summary="Create an integration account",
)
async def create_account(body: AccountCreate, ctx: Ctx, admin: Admin, response: Response) -> AccountOut:
    account = await ctx.accounts.create(body, actor=admin.fingerprint)
    response.headers["Location"] = f"/accounts/{account.id}"
    response.headers["ETag"] = _etag(account)
    return account


ExpiresBefore = Annotated[
    datetime | None,
    Query(description="Only accounts whose credential expires before this instant (RFC 3339)"),
]


@router.get("", response_model=AccountList, responses=ERRORS, summary="List accounts")
async def list_accounts(
    ctx: Ctx,
    _: Admin,
    limit: Limit = 50,
    offset: Offset = 0,
    credential_expires_before: ExpiresBefore = None,
) -> AccountList:
    items = await ctx.accounts.page(
        limit=limit, offset=offset, credential_expires_before=credential_expires_before
    )
    return AccountList(items=items, limit=limit, offset=offset)


@router.get(
    "/{account_id}",
    response_model=AccountOut,
    responses={**ERRORS, 404: {"model": Problem, "description": "account_not_found"}},
    summary="Read an account (secrets are never returned)",
)
async def get_account(account_id: AccountId, ctx: Ctx, _: Admin, response: Response) -> AccountOut:
    account = await ctx.accounts.get(account_id)
    response.headers["ETag"] = _etag(account)
    return account


@router.patch(
    "/{account_id}",
    response_model=AccountOut,
    responses={
        **ERRORS,
        404: {"model": Problem, "description": "account_not_found"},
        409: {"model": Problem, "description": "name_conflict"},
        412: {"model": Problem, "description": "version_conflict: If-Match is stale"},
    },
    summary="Change an account",
)
async def patch_account(
    account_id: AccountId,
    body: AccountPatch,
    ctx: Ctx,
    admin: Admin,
    response: Response,
    if_match: Annotated[str | None, Header(description='The ETag from GET, e.g. "3"')] = None,
) -> AccountOut:
    account = await ctx.accounts.patch(
        account_id, body, if_match=_parse_if_match(if_match), actor=admin.fingerprint
    )
    response.headers["ETag"] = _etag(account)
    return account


@router.delete(
    "/{account_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**ERRORS, 404: {"model": Problem, "description": "account_not_found"}},
    summary="Delete an account and its cached tokens",
)
async def delete_account(account_id: AccountId, ctx: Ctx, admin: Admin) -> Response:
    await ctx.accounts.delete(account_id, actor=admin.fingerprint)
    ctx.keystore.drop_account(account_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{account_id}/events",
    response_model=EventList,
    responses={**ERRORS, 404: {"model": Problem, "description": "account_not_found"}},
    summary="An account's history, newest first",
)
async def account_events(
    account_id: AccountId, ctx: Ctx, _: Admin, limit: Limit = 50, offset: Offset = 0
) -> EventList:
    items = await ctx.accounts.events(account_id, limit=limit, offset=offset)
    return EventList(items=items, limit=limit, offset=offset)
