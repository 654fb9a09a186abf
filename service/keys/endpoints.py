"""Caller keys and service-account bindings: thin handlers over ``KeyService`` and
``ServiceAccountService``."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.deps import Admin, Ctx, KeyId, Limit, Offset, ServiceAccountId
from service.keys.schemas import (
    KeyCreate,
    KeyCreated,
    KeyList,
    KeyOut,
    KeyPatch,
    ServiceAccountCreate,
    ServiceAccountList,
    ServiceAccountOut,
    ServiceAccountPatch,
)
from service.keys.service import KeyService
from service.keys.service_accounts import ServiceAccountService
from service.kit.http import NO_STORE
from service.kit.schemas import Problem

router = APIRouter(prefix="/keys", tags=["keys"])

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    403: {"model": Problem, "description": "Needs an admin key"},
    422: {"model": Problem, "description": "Invalid input"},
}
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": Problem, "description": "key_not_found"}}


def _keys(ctx: Ctx) -> KeyService:
    return ctx.keys


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=KeyCreated,
    responses=ERRORS,
    summary="Create a caller key (the key is shown only in this response)",
)
async def create_key(body: KeyCreate, ctx: Ctx, admin: Admin, response: Response) -> KeyCreated:
    created = await _keys(ctx).create(body, actor=admin.fingerprint)
    response.headers["Location"] = f"/keys/{created.id}"
    response.headers.update(NO_STORE)
    return created


@router.get("", response_model=KeyList, responses=ERRORS, summary="List caller keys (never their values)")
async def list_keys(ctx: Ctx, _: Admin, limit: Limit = 50, offset: Offset = 0) -> KeyList:
    return KeyList(items=await _keys(ctx).page(limit=limit, offset=offset), limit=limit, offset=offset)


@router.get(
    "/{key_id}", response_model=KeyOut, responses={**ERRORS, **NOT_FOUND}, summary="Read a caller key"
)
async def get_key(key_id: KeyId, ctx: Ctx, _: Admin) -> KeyOut:
    return await _keys(ctx).get(key_id)


@router.patch(
    "/{key_id}",
    response_model=KeyOut,
    responses={**ERRORS, **NOT_FOUND},
    summary="Rename a key or change its accounts",
)
async def patch_key(key_id: KeyId, body: KeyPatch, ctx: Ctx, admin: Admin) -> KeyOut:
    return await _keys(ctx).patch(key_id, body, actor=admin.fingerprint)


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**ERRORS, **NOT_FOUND},
    summary="Revoke a caller key",
)
async def delete_key(key_id: KeyId, ctx: Ctx, admin: Admin) -> Response:
    await _keys(ctx).delete(key_id, actor=admin.fingerprint)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


sa_router = APIRouter(prefix="/service-accounts", tags=["service accounts"])
SA_NOT_FOUND: dict[int | str, dict[str, object]] = {
    404: {"model": Problem, "description": "service_account_not_found"}
}
CONFLICT: dict[int | str, dict[str, object]] = {
    409: {"model": Problem, "description": "name_conflict: (namespace, name) is already bound"}
}


def _bindings(ctx: Ctx) -> ServiceAccountService:
    return ctx.service_accounts


@sa_router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ServiceAccountOut,
    responses={**ERRORS, **CONFLICT},
    summary="Let a Kubernetes service account call, as a key of this role and scope",
)
async def create_binding(
    body: ServiceAccountCreate, ctx: Ctx, admin: Admin, response: Response
) -> ServiceAccountOut:
    created = await _bindings(ctx).create(body, actor=admin.fingerprint)
    response.headers["Location"] = f"/service-accounts/{created.id}"
    return created


@sa_router.get(
    "", response_model=ServiceAccountList, responses=ERRORS, summary="List service-account bindings"
)
async def list_bindings(ctx: Ctx, _: Admin, limit: Limit = 50, offset: Offset = 0) -> ServiceAccountList:
    items = await _bindings(ctx).page(limit=limit, offset=offset)
    return ServiceAccountList(items=items, limit=limit, offset=offset)


@sa_router.get(
    "/{binding_id}",
    response_model=ServiceAccountOut,
    responses={**ERRORS, **SA_NOT_FOUND},
    summary="Read a service-account binding",
)
async def get_binding(binding_id: ServiceAccountId, ctx: Ctx, _: Admin) -> ServiceAccountOut:
    return await _bindings(ctx).get(binding_id)


@sa_router.patch(
    "/{binding_id}",
    response_model=ServiceAccountOut,
    responses={**ERRORS, **SA_NOT_FOUND},
    summary="Change a binding's role or accounts",
)
async def patch_binding(
    binding_id: ServiceAccountId, body: ServiceAccountPatch, ctx: Ctx, admin: Admin
) -> ServiceAccountOut:
    return await _bindings(ctx).patch(binding_id, body, actor=admin.fingerprint)


@sa_router.delete(
    "/{binding_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**ERRORS, **SA_NOT_FOUND},
    summary="Remove a binding: its tokens are refused on every replica within 5 s",
)
async def delete_binding(binding_id: ServiceAccountId, ctx: Ctx, admin: Admin) -> Response:
    await _bindings(ctx).delete(binding_id, actor=admin.fingerprint)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
