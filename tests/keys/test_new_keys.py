"""A key made on one replica works on every replica at once; made-up keys cost no query.

Two apps share one database (SQLite file here, MariaDB with the ``mysql`` marker); B's periodic
sync is slow (5 s) and is never run by hand, so whatever B knows of A's key it learnt on demand.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import respx

from service import migrate
from service.keys import store as store_module
from service.keys.store import KeyStore, Principal, has_valid_tag, hash_key, new_tagged_key
from tests.conftest import (
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    make_settings,
    sql_statements,
    v1_token,
)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def idp(azure: respx.MockRouter) -> respx.MockRouter:
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("at-new-keys", "rt-2"))
    return azure


async def _pair(
    url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> AsyncIterator[tuple[Running, Running]]:
    await migrate.upgrade(url)
    async with (
        run_app(make_settings(url, tmp_path / "a", sync_interval_seconds=5.0)) as a,
        run_app(make_settings(url, tmp_path / "b", sync_interval_seconds=5.0)) as b,
    ):
        yield a, b


@pytest.fixture
async def two(
    sqlite_url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> AsyncIterator[tuple[Running, Running]]:
    async for pair in _pair(sqlite_url, tmp_path, run_app):
        yield pair


@pytest.fixture
async def two_mysql(
    mysql_url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> AsyncIterator[tuple[Running, Running]]:
    async for pair in _pair(mysql_url, tmp_path, run_app):
        yield pair


def _selects(statements: list[str]) -> list[str]:
    """The queries among the statements (SQLite also counts its BEGIN IMMEDIATE)."""
    return [s for s in statements if s.lstrip().upper().startswith("SELECT")]


async def _account_and_key(a: Running, role: str = "client") -> tuple[str, dict[str, Any]]:
    r = await a.client.post("/accounts", json=account_body(), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    accounts = [account_id] if role == "client" else None
    r = await a.client.post(
        "/keys", json={"name": "engine", "role": role, "accounts": accounts}, headers=admin()
    )
    assert r.status_code == 201, r.text
    return account_id, r.json()


async def _new_key_works_on_the_other_at_once(a: Running, b: Running) -> None:
    account_id, key = await _account_and_key(a)
    admin_key = (await _account_and_key(a, role="admin"))[1]
    assert b.ctx.keystore.lookup(key["key"]) is None  # B has not synced since
    r = await b.client.get(f"/accounts/{account_id}/token", headers=bearer(key["key"]))
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == "at-new-keys"
    # Learnt with its scope and role: the next call is a fast-path hit; another account is 404.
    found = b.ctx.keystore.lookup(key["key"])
    assert found is not None
    assert found.accounts == frozenset({account_id})
    with sql_statements(b) as statements:
        hit = await b.client.get(f"/accounts/{account_id}/token", headers=bearer(key["key"]))
    assert hit.status_code == 200
    assert "x-request-id" not in hit.headers
    assert statements == []
    other = (await a.client.post("/accounts", json=account_body(), headers=admin())).json()["id"]
    assert (await b.client.get(f"/accounts/{other}/token", headers=bearer(key["key"]))).status_code == 404
    # An admin key made on A manages keys on B at once, body and all.
    r = await b.client.post("/keys", json={"name": "x"}, headers=bearer(admin_key["key"]))
    assert r.status_code == 201, r.text
    assert (await b.client.get("/keys", headers=bearer(key["key"]))).status_code == 403


async def test_a_new_key_works_on_the_other_replica_at_once(
    two: tuple[Running, Running], idp: respx.MockRouter
) -> None:
    """A key made on A is accepted by B on its first request, with its role and scope (no sync)."""
    await _new_key_works_on_the_other_at_once(*two)


@pytest.mark.mysql
async def test_a_new_key_works_on_the_other_replica_at_once_mysql(
    two_mysql: tuple[Running, Running], idp: respx.MockRouter
) -> None:
    """The same on MariaDB: B finds A's new key by its hash on the first request."""
    await _new_key_works_on_the_other_at_once(*two_mysql)


async def test_a_flood_of_made_up_keys_costs_no_query(two: tuple[Running, Running]) -> None:
    """2,000 random keys, and 2,000 of the managed format with a forged tag: all 401, 0 SQL statements."""
    _, b = two
    random_keys = ["tbk_" + secrets.token_urlsafe(32) for _ in range(2_000)]
    forged = [
        "tbk_" + base64.urlsafe_b64encode(secrets.token_bytes(40)).rstrip(b"=").decode() for _ in range(2_000)
    ]
    with sql_statements(b) as statements:
        for key in random_keys + forged:
            r = await b.client.get("/keys", headers=bearer(key))
            assert r.status_code == 401
    assert statements == []


async def test_a_revoked_key_repeated_costs_one_query_and_stays_refused(two: tuple[Running, Running]) -> None:
    """A key revoked on A, repeated 2,000 times on B: 401 every time, one lookup (the negative cache)."""
    a, b = two
    _, key = await _account_and_key(a, role="admin")
    assert (await a.client.delete(f"/keys/{key['id']}", headers=admin())).status_code == 204
    with sql_statements(b) as statements:
        for _ in range(2_000):
            assert (await b.client.get("/keys", headers=bearer(key["key"]))).status_code == 401
    assert len(_selects(statements)) == 1, statements
    assert b.ctx.keystore.absent_count == 1


async def test_revocation_on_one_replica_reaches_the_other_within_the_sync(
    sqlite_url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> None:
    """A key B learnt on demand is refused on B once A revokes it, within B's sync interval."""
    await migrate.upgrade(sqlite_url)
    async with (
        run_app(make_settings(sqlite_url, tmp_path / "a")) as a,
        run_app(make_settings(sqlite_url, tmp_path / "b", sync_interval_seconds=0.2)) as b,
    ):
        _, key = await _account_and_key(a, role="admin")
        assert (await b.client.get("/keys", headers=bearer(key["key"]))).status_code == 200
        started = time.monotonic()
        assert (await a.client.delete(f"/keys/{key['id']}", headers=admin())).status_code == 204
        while (await b.client.get("/keys", headers=bearer(key["key"]))).status_code != 401:
            assert time.monotonic() - started < 5.0
            await asyncio.sleep(0.05)


async def test_concurrent_callers_with_one_new_key_share_one_lookup(two: tuple[Running, Running]) -> None:
    """50 concurrent first requests with one new key on B: all 200, one lookup (key + scope)."""
    a, b = two
    _, key = await _account_and_key(a, role="admin")
    with sql_statements(b) as statements:
        answers = await asyncio.gather(*(b.ctx.keys.resolve(key["key"]) for _ in range(50)))
    assert all(p is not None and p.key_id == key["id"] for p in answers)
    assert len(_selects(statements)) == 2, statements


async def test_a_database_outage_during_a_lookup_is_503_not_401(
    two: tuple[Running, Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the database cannot say whether a tagged key exists, the caller gets 503, not 401."""
    a, b = two
    _, key = await _account_and_key(a, role="admin")

    def broken() -> Any:
        raise OSError("database down")

    monkeypatch.setattr(b.ctx.keys, "_sessions", broken)
    r = await b.client.post("/keys", json={"name": "x"}, headers=bearer(key["key"]))
    assert r.status_code == 503
    assert r.json()["code"] == "storage_unavailable"
    assert key["key"] not in r.text


# -- the store on its own --------------------------------------------------------------------------


def test_tags_are_checked_with_every_key_of_the_ring() -> None:
    """A key tagged with an older ring key still passes; one tagged with a foreign key does not."""
    old, new, foreign = secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32)
    made = new_tagged_key(old)
    assert has_valid_tag(made, (new, old))
    assert not has_valid_tag(made, (foreign,))
    flipped = made[:20] + ("A" if made[20] != "A" else "B") + made[21:]
    assert not has_valid_tag(flipped, (old,))
    assert not has_valid_tag(made[:-1] + ("A" if made[-1] != "A" else "B"), (old,))  # canonical only
    assert not has_valid_tag("tbk_" + secrets.token_urlsafe(32), (old,))
    assert not has_valid_tag(made, ())


def test_the_negative_cache_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Absent keys are remembered at most ABSENT_CACHE_SIZE at a time, each for ABSENT_TTL_SECONDS."""
    tag_key = secrets.token_bytes(32)
    store = KeyStore(tag_keys=(tag_key,))
    monkeypatch.setattr(store_module, "ABSENT_CACHE_SIZE", 100)
    keys = [new_tagged_key(tag_key) for _ in range(250)]
    for key in keys:
        digest = store.worth_looking_up(key)
        assert digest == hash_key(key)
        store.absent(digest)
        assert store.worth_looking_up(key) is None
    assert store.absent_count == 100
    assert store.worth_looking_up(keys[0]) is not None  # the oldest went first
    assert store.worth_looking_up(keys[-1]) is None
    now = time.monotonic()
    monkeypatch.setattr(store_module.time, "monotonic", lambda: now + store_module.ABSENT_TTL_SECONDS + 1)
    assert store.worth_looking_up(keys[-1]) is not None


def test_a_lookup_that_predates_a_local_change_is_not_installed() -> None:
    """A key read from the database before a local revocation is not installed over it."""
    store = KeyStore()
    principal = Principal("k1", "client", None, "k_x", hash_key("raw"))
    mark = store.mark()
    store.remove("k1")
    assert not store.learn(principal, since=mark)
    assert store.lookup("raw") is None
    assert store.learn(principal, since=store.mark())
    assert store.lookup("raw") == principal
