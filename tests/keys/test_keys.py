"""Caller keys managed through the API: CRUD, secrecy, scopes, replicas, usage (SQLite and MariaDB)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import MetaData, select

from service import background, migrate
from service.keys.service import load_principals
from service.models import ApiKey, Event
from tests.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    client,
    make_settings,
    sql_statements,
    v1_token,
)

KEY_FIELDS = {"id", "name", "key", "role", "accounts", "created_at", "prefix", "last_used_at"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_account(running: Running, **overrides: Any) -> str:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


async def new_key(
    running: Running, accounts: list[str] | None = None, *, role: str = "client", name: str | None = None
) -> dict[str, Any]:
    body = {"name": name or f"engine-{uuid.uuid4().hex[:6]}", "role": role, "accounts": accounts}
    r = await running.client.post("/keys", json=body, headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def token(running: Running, key: str, account_id: str) -> httpx.Response:
    return await running.client.get(f"/accounts/{account_id}/token", headers=bearer(key))


def fast_path(r: httpx.Response) -> bool:
    """Fast-path hits are answered in front of the access log, which adds X-Request-Id."""
    return r.status_code == 200 and "x-request-id" not in r.headers


async def until(check: Callable[[], Any], *, within: float = 5.0) -> float:
    """Poll ``check`` (an async callable returning a bool) until true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def idp(azure: respx.MockRouter) -> respx.MockRouter:
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("at-key-test", "rt-2"))
    return azure


# -- the API --------------------------------------------------------------------------------------


async def test_create_shows_the_key_once_and_reads_never_show_it(running: Running) -> None:
    """POST /keys answers 201 with the key; GET /keys and /keys/{id} show a prefix, never the key."""
    account_id = await new_account(running)
    r = await running.client.post(
        "/keys", json={"name": "tenant-a", "role": "client", "accounts": [account_id]}, headers=admin()
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert set(created) == KEY_FIELDS
    assert created["name"] == "tenant-a"
    assert created["role"] == "client"
    assert created["accounts"] == [account_id]
    assert created["last_used_at"] is None
    assert created["key"].startswith("tbk_")
    assert created["key"].startswith(created["prefix"])
    assert len(created["prefix"]) <= 12
    assert r.headers["location"] == f"/keys/{created['id']}"
    assert r.headers["cache-control"] == "no-store"

    listed = await running.client.get("/keys", headers=admin())
    assert listed.status_code == 200
    items = listed.json()["items"]
    assert [i["id"] for i in items] == [created["id"]]
    one = await running.client.get(f"/keys/{created['id']}", headers=admin())
    assert one.status_code == 200
    for shown in (items[0], one.json()):
        assert set(shown) == KEY_FIELDS - {"key"}
        assert shown["prefix"] == created["prefix"]
        assert shown["accounts"] == [account_id]
        assert shown["last_used_at"] is None
    for r in (listed, one):
        assert created["key"] not in r.text
        assert created["key"][len(created["prefix"]) :] not in r.text

    twice = await new_key(running, [account_id, account_id])
    assert twice["accounts"] == [account_id]


async def test_unscoped_key_and_admin_role(running: Running, idp: respx.MockRouter) -> None:
    """`accounts: null` makes an unscoped key; a managed admin key manages keys and cannot be scoped."""
    account_id = await new_account(running)
    unscoped = await new_key(running, None)
    assert unscoped["accounts"] is None
    assert (await token(running, unscoped["key"], account_id)).status_code == 200
    # A scope on an admin key would be a promise not kept (it can manage accounts and mint keys).
    for scope in ([], [account_id]):
        refused = await running.client.post(
            "/keys", json={"name": "scoped boss", "role": "admin", "accounts": scope}, headers=admin()
        )
        assert refused.status_code == 422
        assert refused.json()["errors"][0]["type"] == "scoped_admin"
    boss = await new_key(running, None, role="admin")
    assert boss["role"] == "admin"
    r = await running.client.get("/keys", headers=bearer(boss["key"]))
    assert r.status_code == 200
    assert len(r.json()["items"]) == 2
    assert (await token(running, boss["key"], account_id)).status_code == 200
    rescope = await running.client.patch(
        f"/keys/{boss['id']}", json={"accounts": [account_id]}, headers=admin()
    )
    assert rescope.status_code == 422


async def test_patch_changes_name_and_accounts(running: Running, idp: respx.MockRouter) -> None:
    """PATCH renames and rescopes at once: a list scopes, null unscopes, [] allows nothing."""
    a = await new_account(running)
    b = await new_account(running)
    key = await new_key(running, [a], name="before")
    raw = key["key"]

    async def answers() -> tuple[int, int]:
        return (await token(running, raw, a)).status_code, (await token(running, raw, b)).status_code

    assert await answers() == (200, 404)

    r = await running.client.patch(f"/keys/{key['id']}", json={"name": "after"}, headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "after"
    assert r.json()["accounts"] == [a]
    assert raw not in r.text

    r = await running.client.patch(f"/keys/{key['id']}", json={"accounts": [b]}, headers=admin())
    assert r.json()["accounts"] == [b]
    assert r.json()["name"] == "after"
    assert await answers() == (404, 200)

    r = await running.client.patch(f"/keys/{key['id']}", json={"accounts": None}, headers=admin())
    assert r.json()["accounts"] is None
    assert await answers() == (200, 200)

    r = await running.client.patch(f"/keys/{key['id']}", json={"accounts": []}, headers=admin())
    assert r.json()["accounts"] == []
    assert await answers() == (404, 404)

    r = await running.client.patch(f"/keys/{key['id']}", json={"accounts": [a, b, a]}, headers=admin())
    assert r.json()["accounts"] == sorted([a, b])
    assert await answers() == (200, 200)

    # ...and the stored state says the same after a reload from the database.
    await running.ctx.background.sync_once()
    assert await answers() == (200, 200)
    shown = (await running.client.get(f"/keys/{key['id']}", headers=admin())).json()
    assert (shown["name"], shown["accounts"]) == ("after", sorted([a, b]))


async def test_delete_revokes_at_once_on_fast_and_slow_path(running: Running, idp: respx.MockRouter) -> None:
    """After DELETE the key is 401 at once, also for a token the fast path holds in memory."""
    cached = await new_account(running)
    uncached = await new_account(running)
    key = await new_key(running, [cached, uncached])
    first = await token(running, key["key"], cached)
    assert first.status_code == 200
    assert fast_path(await token(running, key["key"], cached))

    r = await running.client.delete(f"/keys/{key['id']}", headers=admin())
    assert r.status_code == 204
    for account_id in (cached, uncached, "default"):
        r = await token(running, key["key"], account_id)
        assert r.status_code == 401, r.text
        assert "access_token" not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    # A reload from the database does not bring it back, and other keys still get the token.
    await running.ctx.background.sync_once()
    assert (await token(running, key["key"], cached)).status_code == 401
    assert fast_path(await token(running, CLIENT_KEY, cached))
    assert (await running.client.get(f"/keys/{key['id']}", headers=admin())).status_code == 404
    assert (await running.client.get("/keys", headers=admin())).json()["items"] == []


async def test_revocation_survives_a_sync_that_read_before_it(
    running: Running, idp: respx.MockRouter
) -> None:
    """A reload that read the keys before a DELETE committed must not resurrect the key."""
    account_id = await new_account(running)
    key = await new_key(running, [account_id])
    assert (await token(running, key["key"], account_id)).status_code == 200
    store = running.ctx.keystore
    mark = store.mark()
    async with running.ctx.sessions() as session:
        stale = await load_principals(session)  # still holds the key
    assert (await running.client.delete(f"/keys/{key['id']}", headers=admin())).status_code == 204
    store.replace_managed(stale, since=mark)
    assert (await token(running, key["key"], account_id)).status_code == 401
    # A key created while a reload is in flight is not lost either.
    mark = store.mark()
    async with running.ctx.sessions() as session:
        stale = await load_principals(session)
    fresh = await new_key(running, [account_id])
    store.replace_managed(stale, since=mark)
    assert (await token(running, fresh["key"], account_id)).status_code == 200


async def test_client_keys_may_not_manage_keys(running: Running) -> None:
    """Client keys (from the environment or managed) get 403 on /keys; no key gets 401."""
    managed = await new_key(running, None)
    for headers in (client(), bearer(managed["key"])):
        assert (await running.client.get("/keys", headers=headers)).status_code == 403
        assert (await running.client.get(f"/keys/{managed['id']}", headers=headers)).status_code == 403
        r = await running.client.post("/keys", json={"name": "x", "role": "admin"}, headers=headers)
        assert r.status_code == 403
        assert r.json()["code"] == "forbidden"
        r = await running.client.patch(f"/keys/{managed['id']}", json={"accounts": None}, headers=headers)
        assert r.status_code == 403
        assert (await running.client.delete(f"/keys/{managed['id']}", headers=headers)).status_code == 403
    assert (await running.client.get("/keys")).status_code == 401
    assert (await running.client.get("/keys", headers=bearer("tbk_wrong"))).status_code == 401
    assert len((await running.client.get("/keys", headers=admin())).json()["items"]) == 1


async def test_unknown_accounts_are_422(running: Running) -> None:
    """Unknown account ids in `accounts` are 422 on create and on patch (nothing changes)."""
    real = await new_account(running)
    r = await running.client.post(
        "/keys", json={"name": "x", "role": "client", "accounts": [real, "no-such-account"]}, headers=admin()
    )
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "validation_error"
    assert body["errors"][0]["loc"] == ["body", "accounts"]
    assert (await running.client.get("/keys", headers=admin())).json()["items"] == []

    key = await new_key(running, [real])
    r = await running.client.patch(
        f"/keys/{key['id']}", json={"accounts": ["no-such-account"]}, headers=admin()
    )
    assert r.status_code == 422
    assert (await running.client.get(f"/keys/{key['id']}", headers=admin())).json()["accounts"] == [real]


@pytest.mark.parametrize(
    "body",
    [
        {"role": "client"},
        {"name": "x", "role": "root"},
        {"name": "x", "accounts": "all"},
        {"name": "x", "key": "tbk_mine"},
        {"name": ""},
    ],
)
async def test_invalid_create_bodies_are_422(running: Running, body: dict[str, Any]) -> None:
    """A missing name, an unknown role, a non-list scope or a chosen key value is 422."""
    r = await running.client.post("/keys", json=body, headers=admin())
    assert r.status_code == 422
    assert r.json()["code"] == "validation_error"


async def test_unknown_key_id_is_404(running: Running) -> None:
    """GET, PATCH and DELETE of an unknown key id are 404 key_not_found."""
    missing = str(uuid.uuid4())
    for r in (
        await running.client.get(f"/keys/{missing}", headers=admin()),
        await running.client.patch(f"/keys/{missing}", json={"name": "x"}, headers=admin()),
        await running.client.delete(f"/keys/{missing}", headers=admin()),
    ):
        assert r.status_code == 404
        assert r.json()["code"] == "key_not_found"


async def test_key_events_are_recorded(running: Running) -> None:
    """Creation, change and revocation write key_created, key_changed, key_revoked (no account)."""
    key = await new_key(running, None)
    await running.client.patch(f"/keys/{key['id']}", json={"name": "renamed"}, headers=admin())
    await running.client.delete(f"/keys/{key['id']}", headers=admin())
    async with running.ctx.sessions() as session:
        events = list((await session.execute(select(Event).order_by(Event.id))).scalars())
    mine = [e for e in events if e.detail and json.loads(e.detail).get("key_id") == key["id"]]
    assert [e.kind for e in mine] == ["key_created", "key_changed", "key_revoked"]
    assert all(e.account_id is None for e in mine)
    assert all(e.actor and e.actor.startswith("k_") for e in mine)
    assert all(key["key"] not in (e.detail or "") for e in events)


def _leaks(raw: str, text: str) -> bool:
    """Does ``text`` hold the key, or any 8 characters of its secret part beyond the prefix?"""
    secret = raw[10:]
    return raw in text or any(secret[i : i + 8] in text for i in range(len(secret) - 7))


# -- secrecy --------------------------------------------------------------------------------------


async def test_keys_are_random_hashed_and_never_shown_stored_or_logged(
    running: Running, idp: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys carry 256 random bits, are stored only as SHA-256, and never reappear in clear text."""
    caplog.set_level(logging.DEBUG)
    account_id = await new_account(running)
    created = [await new_key(running, [account_id]), await new_key(running, None, role="admin")]
    raws = [c["key"] for c in created]
    assert len(set(raws)) == 2
    for raw in raws:
        secret = raw.removeprefix("tbk_")
        assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) >= 32

    later: list[httpx.Response] = []
    for c in created:
        raw = c["key"]
        later.append(await token(running, raw, account_id))
        later.append(await token(running, raw, account_id))  # a fast-path hit
        later.append(await running.client.get(f"/keys/{c['id']}", headers=admin()))
        later.append(await running.client.patch(f"/keys/{c['id']}", json={"name": "n"}, headers=admin()))
    later.append(await running.client.get("/keys", headers=bearer(raws[1])))
    later.append(await running.client.get("/keys", headers=bearer(raws[0])))  # 403
    later.append(await running.client.get("/keys", headers=bearer(raws[0] + "x")))  # 401
    await running.ctx.background.sync_once()  # writes last_used_at and the usage events
    assert all(r.status_code in (200, 401, 403) for r in later)

    # Not in any response after creation (bodies and headers).
    for r in later:
        blob = r.text + repr(r.headers.multi_items())
        for raw in raws:
            assert not _leaks(raw, blob)

    # Only the hash is stored; no column of any table holds the key.
    def dump(conn: Any) -> list[str]:
        meta = MetaData()
        meta.reflect(conn)
        return [repr(tuple(row)) for table in meta.sorted_tables for row in conn.execute(select(table))]

    async with running.ctx.engine.connect() as conn:
        rows = await conn.run_sync(dump)
        hashes = set((await conn.execute(select(ApiKey.key_hash))).scalars())
    assert hashes == {hashlib.sha256(raw.encode()).hexdigest() for raw in raws}
    assert len(rows) > 5
    for raw in raws:
        assert not [row for row in rows if _leaks(raw, row)]

    # Not in any log record, formatted or not (the SQL parameters included).
    assert any(rec.name == "service.access" for rec in caplog.records)
    for rec in caplog.records:
        text = rec.getMessage() + repr(rec.__dict__)
        for raw in raws:
            assert not _leaks(raw, text)


# -- scope ----------------------------------------------------------------------------------------


def normalised(r: httpx.Response) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = r.json()
    if "instance" in body:
        body["instance"] = "/accounts/<id>/token"
    headers = {k: v for k, v in r.headers.items() if k not in ("x-request-id", "date")}
    return r.status_code, body, headers


async def test_out_of_scope_answers_exactly_like_a_missing_account(
    running: Running, idp: respx.MockRouter
) -> None:
    """Outside its scope a key gets the missing-account answer: status, body and headers."""
    mine = await new_account(running)
    theirs = await new_account(running)
    scoped = await new_key(running, [mine])
    missing_id = str(uuid.uuid4())  # same length as a real id, so Content-Length matches too

    missing = await token(running, scoped["key"], missing_id)
    outside_cold = await token(running, scoped["key"], theirs)
    assert missing.status_code == 404
    assert missing.json()["code"] == "account_not_found"
    assert normalised(outside_cold) == normalised(missing)

    # On the fast path: the token of `theirs` is in memory (an unscoped key fetched it).
    warm = await token(running, CLIENT_KEY, theirs)
    assert warm.status_code == 200
    assert fast_path(await token(running, CLIENT_KEY, theirs))
    outside_warm = await token(running, scoped["key"], theirs)
    assert outside_warm.status_code == 404
    assert "access_token" not in outside_warm.text
    assert normalised(outside_warm) == normalised(missing)
    assert (await token(running, scoped["key"], mine)).status_code == 200


async def test_default_resolves_only_inside_the_scope(running: Running, idp: respx.MockRouter) -> None:
    """`default` is the default account for keys whose scope holds it, and 404 for the others."""
    default = await new_account(running, default_account=True)
    other = await new_account(running)
    inside = await new_key(running, [default, other])
    outside = await new_key(running, [other])
    nothing = await new_key(running, [])
    missing = await token(running, outside["key"], str(uuid.uuid4()))

    for warm in (False, True):
        if warm:
            assert (await token(running, CLIENT_KEY, "default")).status_code == 200
            assert fast_path(await token(running, CLIENT_KEY, "default"))
        r = await token(running, inside["key"], "default")
        assert r.status_code == 200
        assert r.json()["account_id"] == default
        for key in (outside, nothing):
            r = await token(running, key["key"], "default")
            assert r.status_code == 404, r.text
            assert "access_token" not in r.text
            # Same answer as a missing account (Content-Length aside: the path differs in length).
            assert normalised(r)[:2] == normalised(missing)[:2]
            assert _without_length(normalised(r)[2]) == _without_length(normalised(missing)[2])


def _without_length(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != "content-length"}


async def test_deleting_an_account_removes_it_from_every_scope(
    running: Running, idp: respx.MockRouter
) -> None:
    """DELETE /accounts/{id} takes the account out of every key's scope, here and after a reload."""
    a = await new_account(running)
    b = await new_account(running)
    k1 = await new_key(running, [a, b])
    k2 = await new_key(running, [a])
    assert (await running.client.delete(f"/accounts/{a}", headers=admin())).status_code == 204
    for _ in range(2):
        one = (await running.client.get(f"/keys/{k1['id']}", headers=admin())).json()
        two = (await running.client.get(f"/keys/{k2['id']}", headers=admin())).json()
        assert (one["accounts"], two["accounts"]) == ([b], [])
        assert running.ctx.keystore.lookup(k1["key"]).accounts == frozenset({b})
        assert running.ctx.keystore.lookup(k2["key"]).accounts == frozenset()
        assert (await token(running, k1["key"], b)).status_code == 200
        await running.ctx.background.sync_once()


# -- property: every (key, account) pair ----------------------------------------------------------


@pytest.fixture(params=[1, 2], ids=["one-replica", "two-replicas"])
async def replicas(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> AsyncIterator[tuple[Running, Running]]:
    """(writer, reader): the same app, or two apps over one database (the reader learns by sync)."""
    await migrate.upgrade(database_url)
    async with run_app(make_settings(database_url, tmp_path / "a")) as a:
        if request.param == 1:
            yield a, a
        else:
            async with run_app(make_settings(database_url, tmp_path / "b")) as b:
                yield a, b


@st.composite
def worlds(draw: st.DrawFn) -> tuple[int, int | None, list[tuple[str, frozenset[int] | None]]]:
    """How many accounts, which one is the default (or none), and each key's role and scope."""
    n = draw(st.integers(3, 5))
    default = draw(st.none() | st.integers(0, n - 1))
    scope = st.none() | st.frozensets(st.integers(0, n - 1), max_size=n)
    # Admin keys are always unscoped (a scoped one is refused); client keys take any scope.
    key = st.tuples(st.just("client"), scope) | st.tuples(st.just("admin"), st.none())
    keys = draw(st.lists(key, min_size=2, max_size=4))
    return n, default, keys


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(world=worlds())
async def test_every_key_account_pair_answers_as_its_scope_says(
    replicas: tuple[Running, Running],
    azure: respx.MockRouter,
    world: tuple[int, int | None, list[tuple[str, frozenset[int] | None]]],
) -> None:
    """Each (key, account) pair is 200 exactly when the scope allows it, else 404, on both paths."""
    writer, reader = replicas
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("at-prop", "rt-2"))
    n, default, key_specs = world
    accounts = [await new_account(writer, default_account=(i == default)) for i in range(n)]
    keys: list[tuple[str, frozenset[str] | None]] = [(ADMIN_KEY, None), (CLIENT_KEY, None)]
    created_ids = []
    for role, scope in key_specs:
        allowed = None if scope is None else sorted(accounts[i] for i in scope)
        created = await new_key(writer, allowed, role=role)
        created_ids.append(created["id"])
        keys.append((created["key"], None if allowed is None else frozenset(allowed)))
    if reader is not writer:
        await reader.ctx.background.sync_once()
    default_id = None if default is None else accounts[default]
    try:
        # Cold first (the slow path for whichever key asks first), then all warm (the fast path).
        for warm in (False, True):
            for raw, allowed in keys:
                for asked in [*accounts, "default"]:
                    target = default_id if asked == "default" else asked
                    expect = 200 if target is not None and (allowed is None or target in allowed) else 404
                    r = await token(reader, raw, asked)
                    assert r.status_code == expect, (asked, allowed, r.text)
                    if expect == 200:
                        assert r.json()["account_id"] == target
                        assert fast_path(r) or not warm
                    else:
                        assert r.json()["code"] == "account_not_found"
                        assert "access_token" not in r.text
            for account_id in accounts:
                assert (await token(reader, CLIENT_KEY, account_id)).status_code == 200
    finally:
        for key_id in created_ids:
            assert (await writer.client.delete(f"/keys/{key_id}", headers=admin())).status_code == 204
        for account_id in accounts:
            assert (await writer.client.delete(f"/accounts/{account_id}", headers=admin())).status_code == 204
        if reader is not writer:
            await reader.ctx.background.sync_once()


# -- two replicas on MariaDB ----------------------------------------------------------------------


@pytest.fixture
async def two(
    mysql_url: str, tmp_path: Path, run_app: Callable[..., Any]
) -> AsyncIterator[tuple[Running, Running]]:
    """Replicas A and B on one MariaDB database, syncing every 0.2 s."""
    await migrate.upgrade(mysql_url)
    async with (
        run_app(make_settings(mysql_url, tmp_path / "a", sync_interval_seconds=0.2)) as a,
        run_app(make_settings(mysql_url, tmp_path / "b", sync_interval_seconds=0.2)) as b,
    ):
        yield a, b


@pytest.mark.mysql
async def test_key_created_on_one_replica_works_on_the_other(
    two: tuple[Running, Running], idp: respx.MockRouter
) -> None:
    """A key created on A is accepted by B within one sync interval."""
    a, b = two
    account_id = await new_account(a)
    key = await new_key(a, [account_id])
    assert (await token(a, key["key"], account_id)).status_code == 200

    async def works() -> bool:
        return (await token(b, key["key"], account_id)).status_code == 200

    elapsed = await until(works, within=5.0)
    assert elapsed < 1.0  # 0.2 s interval, with room for a slow CI machine


@pytest.mark.mysql
async def test_revocation_reaches_the_other_replica_within_the_bound(
    two: tuple[Running, Running], idp: respx.MockRouter
) -> None:
    """DELETE on A: 401 on A at once, and on B (even for B's cached token) within 5 s."""
    a, b = two
    account_id = await new_account(a)
    key = await new_key(a, [account_id])
    await until(lambda: _status_is(b, key["key"], account_id, 200))
    assert fast_path(await token(b, key["key"], account_id))

    started = time.monotonic()
    assert (await a.client.delete(f"/keys/{key['id']}", headers=admin())).status_code == 204
    assert (await token(a, key["key"], account_id)).status_code == 401
    await until(lambda: _status_is(b, key["key"], account_id, 401), within=5.0)
    assert time.monotonic() - started < 5.0
    assert fast_path(await token(b, CLIENT_KEY, account_id))


@pytest.mark.mysql
async def test_scope_change_and_account_deletion_reach_the_other_replica(
    two: tuple[Running, Running], idp: respx.MockRouter
) -> None:
    """A PATCH of the scope on A, and an account deleted on A, change what B answers."""
    a, b = two
    first = await new_account(a)
    second = await new_account(a)
    key = await new_key(a, [first])
    await until(lambda: _status_is(b, key["key"], first, 200))
    assert (await token(b, CLIENT_KEY, second)).status_code == 200  # warm on B
    assert (await token(b, key["key"], second)).status_code == 404

    r = await a.client.patch(f"/keys/{key['id']}", json={"accounts": [second]}, headers=admin())
    assert r.status_code == 200
    await until(lambda: _status_is(b, key["key"], second, 200), within=5.0)
    assert (await token(b, key["key"], first)).status_code == 404

    assert (await a.client.delete(f"/accounts/{second}", headers=admin())).status_code == 204
    await until(lambda: _status_is(b, key["key"], second, 404), within=5.0)
    assert b.ctx.keystore.lookup(key["key"]).accounts == frozenset()
    assert (await b.client.get(f"/keys/{key['id']}", headers=admin())).json()["accounts"] == []


async def _status_is(running: Running, key: str, account_id: str, status: int) -> bool:
    return (await token(running, key, account_id)).status_code == status


# -- usage --------------------------------------------------------------------------------------


async def _usage_events(running: Running, key_id: str) -> list[dict[str, Any]]:
    async with running.ctx.sessions() as session:
        rows = (await session.execute(select(Event).where(Event.kind == "tokens_fetched"))).scalars()
        details = [
            json.loads(e.detail or "{}") | {"actor": e.actor, "account_id": e.account_id} for e in rows
        ]
    return [d for d in details if d["key_id"] == key_id]


async def _last_used(running: Running, key_id: str) -> str | None:
    r = await running.client.get(f"/keys/{key_id}", headers=admin())
    value: str | None = r.json()["last_used_at"]
    return value


async def test_last_used_at_and_sampled_usage_at_most_once_a_minute(
    running: Running, idp: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last_used_at is set after use and, like the tokens_fetched count, written once a minute per key."""
    account_id = await new_account(running)
    assert (await token(running, CLIENT_KEY, account_id)).status_code == 200  # warm: every call below hits
    key = await new_key(running, [account_id])
    assert await _last_used(running, key["id"]) is None
    for _ in range(3):
        assert fast_path(await token(running, key["key"], account_id))
    await running.ctx.background.sync_once()
    first = await _last_used(running, key["id"])
    assert first is not None
    events = await _usage_events(running, key["id"])
    assert [e["requests"] for e in events] == [3]
    assert events[0]["account_id"] is None
    assert events[0]["actor"] == "k_" + hashlib.sha256(key["key"].encode()).hexdigest()[:10]

    # Used again within the minute: nothing is written, however often the sync runs.
    await asyncio.sleep(1.1)  # TIMESTAMP columns may have one-second resolution
    for _ in range(2):
        assert fast_path(await token(running, key["key"], account_id))
    for _ in range(3):
        await running.ctx.background.sync_once()
    assert await _last_used(running, key["id"]) == first
    assert [e["requests"] for e in await _usage_events(running, key["id"])] == [3]

    # Once the minute is over (here: made zero), the pending use and its count are written.
    monkeypatch.setattr(background, "KEY_USAGE_EVERY_SECONDS", 0.0)
    await running.ctx.background.sync_once()
    later = await _last_used(running, key["id"])
    assert later is not None
    assert later > first
    assert [e["requests"] for e in await _usage_events(running, key["id"])] == [3, 2]
    # Nothing used since: nothing more written.
    await running.ctx.background.sync_once()
    assert len(await _usage_events(running, key["id"])) == 2


async def test_usage_pending_at_shutdown_is_written(
    settings: Any, run_app: Callable[..., Any], idp: respx.MockRouter
) -> None:
    """A replica that stops writes the usage still waiting for its minute: none is lost."""
    async with run_app(settings) as running:
        account_id = await new_account(running)
        key = await new_key(running, [account_id])
        assert (await token(running, key["key"], account_id)).status_code == 200
        await running.ctx.background.sync_once()
        first = await _last_used(running, key["id"])
        await asyncio.sleep(1.1)  # TIMESTAMP columns may have one-second resolution
        for _ in range(4):
            assert fast_path(await token(running, key["key"], account_id))
        await running.ctx.background.sync_once()  # within the minute: nothing written yet
        assert await _last_used(running, key["id"]) == first
    async with run_app(settings) as again:
        later = await _last_used(again, key["id"])
        assert first is not None
        assert later is not None
        assert later > first
        assert [e["requests"] for e in await _usage_events(again, key["id"])] == [1, 4]


async def test_shutdown_does_not_wait_for_a_database_that_does_not_answer(
    settings: Any,
    run_app: Callable[..., Any],
    idp: respx.MockRouter,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The flush at shutdown is bounded: a hung database costs the pending usage, not the shutdown."""
    monkeypatch.setattr(background, "FLUSH_TIMEOUT_SECONDS", 0.2)

    async def hung(**_kw: Any) -> None:
        await asyncio.sleep(3600)

    async with run_app(settings) as running:
        account_id = await new_account(running)
        key = await new_key(running, [account_id])
        assert (await token(running, key["key"], account_id)).status_code == 200
        monkeypatch.setattr(running.ctx.background, "write_key_usage", hung)
        started = time.monotonic()
    assert time.monotonic() - started < 5
    assert any(r.getMessage() == "key usage not saved at shutdown" for r in caplog.records)


# -- the hot path -----------------------------------------------------------------------------------


async def test_scoped_key_cache_hit_does_no_database_io(running: Running, idp: respx.MockRouter) -> None:
    """A cache hit with a scoped DB-managed key runs no SQL: the key and its scope are in memory."""
    mine = await new_account(running)
    key = await new_key(running, [mine])
    assert (await token(running, key["key"], mine)).status_code == 200
    with sql_statements(running) as statements:
        for _ in range(50):
            assert fast_path(await token(running, key["key"], mine))
    assert statements == []
