"""Races with a concurrent DELETE answer what the loser would get had it come second, never 503.

Each test interleaves the two requests deterministically: a wrapper around the first request's
read runs the DELETE to completion just after that read, so the first request's write then meets
a vanished row (IntegrityError on a foreign key, or StaleDataError on an UPDATE of 0 rows). The
key races need MariaDB: on SQLite every transaction takes the write lock first (BEGIN IMMEDIATE),
so those two requests cannot interleave there at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from service import migrate
from service.authorization.service import AuthorizationService
from service.keys import repository as keys_repo
from tests.conftest import account_body, admin, make_settings


async def _account(running: Any, **overrides: Any) -> str:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


def _once_after(original: Callable[..., Awaitable[Any]], then: Callable[[], Awaitable[None]]) -> Any:
    """``original`` that, the first time only, runs ``then`` to completion before returning."""
    fired = asyncio.Event()

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        if not fired.is_set():
            fired.set()
            await then()
        return result

    return wrapper


@pytest.fixture
async def mysql_running(mysql_url: str, tmp_path: Path, run_app: Callable[..., Any]) -> Any:
    await migrate.upgrade(mysql_url)
    async with run_app(make_settings(mysql_url, tmp_path)) as running:
        yield running


async def test_authorize_vs_delete_of_the_account_is_404(
    running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /authorize whose account is deleted after it was read answers 404 account_not_found."""
    account_id = await _account(running, refresh_token=None)

    async def delete() -> None:
        r = await running.client.delete(f"/accounts/{account_id}", headers=admin())
        assert r.status_code == 204

    monkeypatch.setattr(AuthorizationService, "_load", _once_after(AuthorizationService._load, delete))
    r = await running.client.post(f"/accounts/{account_id}/authorize", headers=admin())
    assert (r.status_code, r.json()["code"]) == (404, "account_not_found")


@pytest.mark.mysql
async def test_create_key_vs_delete_of_its_account_is_422(
    mysql_running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /keys naming an account deleted mid-request answers as if the account were gone (422)."""
    running = mysql_running
    account_id = await _account(running)

    async def delete() -> None:
        assert (await running.client.delete(f"/accounts/{account_id}", headers=admin())).status_code == 204

    monkeypatch.setattr(keys_repo, "insert_key", _once_after(keys_repo.insert_key, delete))
    body = {"name": "engine", "role": "client", "accounts": [account_id]}
    r = await running.client.post("/keys", json=body, headers=admin())
    assert (r.status_code, r.json()["code"]) == (422, "validation_error"), r.text
    assert r.json()["errors"][0]["type"] == "unknown_account"
    listed = await running.client.get("/keys", headers=admin())
    assert [k["name"] for k in listed.json()["items"]] == []


@pytest.mark.mysql
@pytest.mark.parametrize("patch", [{"name": "renamed"}, {"accounts": []}, {"name": "n", "accounts": None}])
async def test_patch_key_vs_delete_of_the_key_is_404(
    patch: dict[str, Any], mysql_running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PATCH /keys/{id} of a key deleted after it was read answers 404 key_not_found."""
    running = mysql_running
    account_id = await _account(running)
    r = await running.client.post(
        "/keys", json={"name": "engine", "role": "client", "accounts": [account_id]}, headers=admin()
    )
    key_id = r.json()["id"]

    async def delete() -> None:
        assert (await running.client.delete(f"/keys/{key_id}", headers=admin())).status_code == 204

    monkeypatch.setattr(keys_repo, "get_key", _once_after(keys_repo.get_key, delete))
    r = await running.client.patch(f"/keys/{key_id}", json=patch, headers=admin())
    assert (r.status_code, r.json()["code"]) == (404, "key_not_found"), r.text


@pytest.mark.mysql
async def test_delete_key_twice_at_once_is_one_204_and_one_404(
    mysql_running: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two DELETEs that both read the key: the one that finds nothing to delete answers 404."""
    running = mysql_running
    r = await running.client.post("/keys", json={"name": "k", "role": "client"}, headers=admin())
    key_id = r.json()["id"]
    second: list[int] = []

    async def delete() -> None:
        second.append((await running.client.delete(f"/keys/{key_id}", headers=admin())).status_code)

    monkeypatch.setattr(keys_repo, "get_key", _once_after(keys_repo.get_key, delete))
    r = await running.client.delete(f"/keys/{key_id}", headers=admin())
    assert (r.status_code, r.json()["code"], second) == (404, "key_not_found", [204])
