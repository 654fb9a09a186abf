"""Caller keys: thin handlers over ``KeyService``."""

from __future__ import annotations

from fastapi import APIRouter, Response, status

from service.api.deps import Admin, Ctx, KeyId, Limit, Offset
from service.keys.schemas import KeyCreate, KeyCreated, KeyList, KeyOut, KeyPatch
from service.keys.service import KeyService
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
