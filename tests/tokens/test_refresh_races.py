"""Refreshes meeting other work (SQLite and MariaDB): a slow Azure and the connection pool, admin
changes while Azure answers, accounts held after a failure, a min_ttl Azure cannot meet."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import respx

from service.errors import UpstreamUnavailable
from service.settings import Settings
from tests.conftest import (
    CLIENT_SECRET,
    TOKEN_URL_V1,
    account_body,
    admin,
    client,
    sql_statements,
    v1_token,
)
from tests.tokens.test_tokens import Held, create, form, stored_refresh_token

SLOTS = 5  # BROKER_MAX_CONCURRENT_REFRESHES in the tests of the limit


async def test_slow_azure_leaves_the_pool_to_probes_and_admins(
    settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """At most BROKER_MAX_CONCURRENT_REFRESHES refreshes are at Azure while it is slow, holding
    no connection; /readyz and the admin API keep answering, and every caller gets its token once
    Azure does."""
    held = Held(httpx.Response(200, json=v1_token("slow", "rt-2")))
    azure.post(TOKEN_URL_V1).mock(side_effect=held)
    async with run_app(settings.model_copy(update={"max_concurrent_refreshes": SLOTS})) as running:
        ids = [await create(running) for _ in range(SLOTS + 5)]
        waiters = [asyncio.create_task(running.ctx.broker.get_token(i)) for i in ids]
        await held.until_arrived(SLOTS)
        for _ in range(50):  # every waiter gets the chance to start its refresh
            await asyncio.sleep(0)
        assert held.arrived == SLOTS
        pool = running.ctx.engine.pool

        async def connections_returned() -> None:  # the queued callers' reads end; Azure holds none
            while pool.checkedout() > 1:  # at most the replica lock's connection (MySQL)
                await asyncio.sleep(0.01)

        await asyncio.wait_for(connections_returned(), timeout=10)
        assert held.arrived == SLOTS
        assert (await running.client.get("/readyz")).status_code == 200
        assert (await running.client.get("/accounts", headers=admin())).status_code == 200
        held.release.set()
        tokens = await asyncio.gather(*waiters)
        assert {t.access_token for t in tokens} == {"slow"}
        assert held.arrived == len(ids)


async def test_default_moving_elsewhere_during_a_refresh_keeps_its_result(
    running: Any, azure: respx.MockRouter
) -> None:
    """Another account becoming the default moves this one's VERSION while Azure answers: the
    rotated refresh token is still stored (nothing about this account's credentials changed)."""
    held = Held(httpx.Response(200, json=v1_token("fresh", "rt-rotated")))
    azure.post(TOKEN_URL_V1).mock(side_effect=held)
    account_id = await create(running, default_account=True)
    waiter = asyncio.create_task(running.ctx.broker.get_token(account_id))
    await held.until_arrived()
    other = await running.client.post("/accounts", json=account_body(default_account=True), headers=admin())
    assert other.status_code == 201
    held.release.set()
    assert (await waiter).access_token == "fresh"
    assert await stored_refresh_token(running, account_id) == "rt-rotated"
    got = (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()
    assert (got["status"], got["default_account"]) == ("ready", False)


async def test_a_token_for_replaced_credentials_is_never_served_after_the_change(
    running: Any, azure: respx.MockRouter
) -> None:
    """An admin replaces the secret while Azure answers a refresh made with the old one. On SQLite
    (Azure called outside a transaction) that result is dropped; on MySQL the PATCH waits for the
    refresh. Either way, once the PATCH is done, callers get a token from the new secret."""
    release = asyncio.Event()
    secrets: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        secret = form(request)["client_secret"]
        secrets.append(secret)
        if secret == CLIENT_SECRET:
            await release.wait()
            return httpx.Response(200, json=v1_token("from-old-secret", None))
        return httpx.Response(200, json=v1_token("from-new-secret", None))

    azure.post(TOKEN_URL_V1).mock(side_effect=answer)
    account_id = await create(running)
    waiter = asyncio.create_task(running.ctx.broker.get_token(account_id))
    while not secrets:
        await asyncio.sleep(0.01)
    patch = asyncio.create_task(
        running.client.patch(
            f"/accounts/{account_id}", json={"client_secret": "new-secret~value-0123456789"}, headers=admin()
        )
    )
    await asyncio.wait({patch}, timeout=1.0)  # SQLite: done; MySQL: waits for the row lock
    release.set()
    assert (await patch).status_code == 200
    first = await asyncio.gather(waiter, return_exceptions=True)
    if isinstance(first[0], UpstreamUnavailable):
        assert first[0].reason == "conflict"
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == "from-new-secret"


async def test_a_refused_account_is_not_asked_about_again_on_every_request(
    running: Any, azure: respx.MockRouter
) -> None:
    """Azure refused the refresh token while a cached token is still valid: the requests that keep
    getting it run no SQL (the refusal is remembered until the account changes)."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("short", "rt-2", expires_in=200)),  # inside the margin
        httpx.Response(
            400,
            json={
                "error": "invalid_grant",
                "error_description": "AADSTS70008: expired",
                "error_codes": [70008],
            },
        ),
    ]
    account_id = await create(running)
    broker = running.ctx.broker
    assert (await running.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    assert (await running.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    while broker.refreshes_in_flight:  # the background refresh that Azure refuses
        await asyncio.sleep(0.01)
    got = (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()
    assert got["status"] == "needs_authorization"
    with sql_statements(running) as statements:
        for _ in range(30):
            r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
            assert r.json()["access_token"] == "short"
            await asyncio.sleep(0)
        while broker.refreshes_in_flight:
            await asyncio.sleep(0.01)
    assert statements == []
    assert route.call_count == 2
    # A new refresh token (the account changes) lifts the hold at once.
    route.side_effect = None
    route.return_value = httpx.Response(200, json=v1_token("after", "rt-3"))
    patched = await running.client.patch(
        f"/accounts/{account_id}", json={"refresh_token": "0.new-refresh-token"}, headers=admin()
    )
    assert patched.status_code == 200
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.json()["access_token"] == "after"


async def test_min_ttl_beyond_azures_lifetime_forces_one_refresh_not_one_per_request(
    running: Any, azure: respx.MockRouter
) -> None:
    """A caller repeating ?min_ttl=3600 (Azure's tokens live 3599 s) gets the fresh token it
    forced, not a new refresh token redemption on every request."""
    numbers = itertools.count(1)

    def answer(_request: httpx.Request) -> httpx.Response:
        n = next(numbers)
        return httpx.Response(200, json=v1_token(f"at-{n}", f"rt-{n + 1}"))

    route = azure.post(TOKEN_URL_V1).mock(side_effect=answer)
    account_id = await create(running)
    assert (await running.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    answers = [
        await running.client.get(f"/accounts/{account_id}/token?min_ttl=3600", headers=client())
        for _ in range(10)
    ]
    assert {a.status_code for a in answers} == {200}
    assert {a.json()["access_token"] for a in answers} == {"at-2"}
    assert route.call_count == 2


async def test_default_missing_or_out_of_scope_costs_the_same_lookups(
    running: Any, azure: respx.MockRouter
) -> None:
    """A scoped key cannot tell a missing default from one outside its scope by the work done."""
    mine = await create(running)
    key = (
        await running.client.post(
            "/keys", json={"name": "scoped", "role": "client", "accounts": [mine]}, headers=admin()
        )
    ).json()["key"]

    async def lookups() -> int:
        with sql_statements(running) as statements:
            r = await running.client.get(
                "/accounts/default/token", headers={"Authorization": f"Bearer {key}"}
            )
        assert r.status_code == 404
        return len(statements)

    missing = await lookups()
    await create(running, default_account=True)  # a default outside the key's scope
    running.ctx.broker.default_account_id = None  # the fast path must not decide this one
    assert await lookups() == missing


async def test_background_refreshes_leave_slots_to_callers_without_a_token(
    settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """Stale tokens being refreshed in the background (Azure slow) take at most the limiter's
    background slots: a caller with no token at all still gets a slot and its token at once."""
    release, hold, held = asyncio.Event(), False, 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal held
        if form(request)["refresh_token"] == "rt-for-the-caller":
            return httpx.Response(200, json=v1_token("for-the-caller", None))
        if hold:
            held += 1
            await release.wait()
        return httpx.Response(200, json=v1_token("stale", None, expires_in=200))  # inside the margin

    azure.post(TOKEN_URL_V1).mock(side_effect=answer)
    async with run_app(settings.model_copy(update={"max_concurrent_refreshes": SLOTS})) as running:
        background_slots = running.ctx.broker.limiter.background_slots
        stale = [await create(running) for _ in range(SLOTS)]
        for account_id in stale:
            assert (
                await running.client.get(f"/accounts/{account_id}/token", headers=client())
            ).status_code == 200
        hold = True
        broker = running.ctx.broker
        for account_id in stale:  # stale hits: each may start a background refresh
            r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
            assert r.json()["access_token"] == "stale"

        async def settled() -> None:  # each refresh is waiting at Azure or has given its slot up
            while held < background_slots or broker.refreshes_in_flight != held:
                await asyncio.sleep(0.01)

        await asyncio.wait_for(settled(), timeout=10)
        assert held == background_slots
        other = await create(running, refresh_token="rt-for-the-caller")
        r = await asyncio.wait_for(
            running.client.get(f"/accounts/{other}/token", headers=client()), timeout=10
        )
        assert r.json()["access_token"] == "for-the-caller"
        release.set()


async def test_min_ttl_callers_join_the_forced_refresh_and_get_no_less_after_it_failed(
    running: Any, azure: respx.MockRouter
) -> None:
    """Two callers asking ?min_ttl=600 of a token with 500 s left share one refresh; when a forced
    refresh fails, the next such caller is not handed the token that is too short for it."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [httpx.Response(200, json=v1_token("short", "rt-2", expires_in=500))]
    account_id = await create(running)
    assert (await running.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    held = Held(httpx.Response(200, json=v1_token("long", "rt-3")))
    route.side_effect = held
    url = f"/accounts/{account_id}/token?min_ttl=600"
    first = asyncio.create_task(running.client.get(url, headers=client()))
    await held.until_arrived()
    second = asyncio.create_task(running.client.get(url, headers=client()))
    for _ in range(20):
        await asyncio.sleep(0)
    held.release.set()
    assert [(await t).json()["access_token"] for t in (first, second)] == ["long", "long"]
    assert held.arrived == 1

    failing = await create(running)
    route.side_effect = [
        httpx.Response(200, json=v1_token("short", "rt-4", expires_in=500)),
        httpx.Response(503, json={"error": "temporarily_unavailable"}),
        httpx.Response(503, json={"error": "temporarily_unavailable"}),
    ]
    assert (await running.client.get(f"/accounts/{failing}/token", headers=client())).status_code == 200
    url = f"/accounts/{failing}/token?min_ttl=600"
    assert (await running.client.get(url, headers=client())).status_code == 503
    assert (await running.client.get(url, headers=client())).status_code == 503
