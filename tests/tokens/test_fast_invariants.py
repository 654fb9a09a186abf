"""Fast guards for three token invariants that otherwise only the multi-process and fault suites catch.

* One Azure AD call per account across replicas: two apps (two lifespans, two engines, two
  brokers) over one MariaDB database in this process, racing for the same account while Azure's
  answer is held open on an event.
* The stored backoff: after a transient failure a fresh broker over the same database (no memory
  of the failure) does not ask Azure AD before ``next_attempt_at``.
* ``BROKER_MIN_TOKEN_TTL_SECONDS``: with the broker's clock moved forward, a token with less than
  the minimum left is never handed out, whatever the caller's ``min_ttl``.
Only public behaviour is used: HTTP through the app, and the broker's ``get_token``/``peek``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service import migrate
from service.settings import Settings
from tests.conftest import TOKEN_URL_V1, account_body, admin, client, make_settings, v1_token


async def create(running: Any) -> str:
    r = await running.client.post("/accounts", json=account_body(), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


@pytest.mark.mysql
async def test_two_replicas_racing_for_one_account_make_one_azure_call(
    mysql_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """While replica 1's refresh is inside Azure AD, replica 2 asking for the same account does not
    call Azure; it gives up within its bounded wait, and afterwards serves replica 1's stored token."""
    await migrate.upgrade(mysql_url)
    inside, second_inside, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    calls: list[str] = []

    async def held_azure(request: httpx.Request) -> httpx.Response:
        calls.append(request.content.decode())
        (second_inside if len(calls) > 1 else inside).set()
        await release.wait()
        return httpx.Response(200, json=v1_token("at-replica-1", None))

    azure.post(TOKEN_URL_V1).mock(side_effect=held_azure)
    # Replica 2 waits at most ~1 s for another replica's refresh (its own bounds, not the test's).
    patient = make_settings(mysql_url, tmp_path / "one")
    brief = make_settings(
        mysql_url, tmp_path / "two", lock_wait_seconds=1, idp_timeout_seconds=0.5, max_wait_seconds=2
    )
    async with run_app(patient) as one, run_app(brief) as two:
        account_id = await create(one)
        path = f"/accounts/{account_id}/token"
        first = asyncio.create_task(one.client.get(path, headers=client()))
        try:
            await inside.wait()
            second = asyncio.create_task(two.client.get(path, headers=client()))
            second_call = asyncio.create_task(second_inside.wait())
            # Either replica 2 answers (correct), or it reaches Azure AD (the invariant broken).
            await asyncio.wait({second, second_call}, return_when=asyncio.FIRST_COMPLETED)
            second_call.cancel()
            assert len(calls) == 1, "replica 2 called Azure AD while replica 1 was refreshing"
            r2 = await second
            assert r2.status_code == 503, r2.text
            assert r2.json()["code"] == "upstream_unavailable"
            assert int(r2.headers["Retry-After"]) >= 1
        finally:
            release.set()
        r1 = await first
        assert r1.json()["access_token"] == "at-replica-1"
        r = await two.client.get(path, headers=client())
        assert r.json()["access_token"] == "at-replica-1"
    assert len(calls) == 1


def timed_out(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("Azure AD is slow", request=request)


FAILURES: dict[str, Callable[[httpx.Request], httpx.Response]] = {
    "server error": lambda _r: httpx.Response(503, text="busy"),
    "throttled with Retry-After": lambda _r: httpx.Response(
        429, headers={"Retry-After": "300"}, json={"error": "temporarily_unavailable"}
    ),
    "timeout": timed_out,
}


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
async def test_a_fresh_broker_honours_the_stored_backoff(
    database_url: str,
    tmp_path: Path,
    run_app: Callable[[Settings], Any],
    azure: respx.MockRouter,
    failure: Callable[[httpx.Request], httpx.Response],
) -> None:
    """After a transient failure, a new app over the same database (nothing in memory) answers 503
    ``backoff`` with the time left and does not ask Azure AD before ``next_attempt_at``."""
    await migrate.upgrade(database_url)
    settings = make_settings(database_url, tmp_path, backoff_base_seconds=600.0, backoff_max_seconds=600.0)
    route = azure.post(TOKEN_URL_V1).mock(side_effect=failure)
    async with run_app(settings) as first:
        account_id = await create(first)
        r = await first.client.get(f"/accounts/{account_id}/token", headers=client())
        assert r.status_code == 503, r.text
        assert route.call_count == 1
    async with run_app(settings) as fresh:
        r = await fresh.client.get(f"/accounts/{account_id}/token", headers=client())
        assert r.status_code == 503, r.text
        assert (r.json()["code"], r.json()["reason"]) == ("upstream_unavailable", "backoff")
        assert 250 <= int(r.headers["Retry-After"]) <= 600
        account = (await fresh.client.get(f"/accounts/{account_id}", headers=admin())).json()
        assert account["status"] == "failing"
    assert route.call_count == 1


async def test_a_token_inside_the_minimum_lifetime_is_never_handed_out(
    running: Any, azure: respx.MockRouter
) -> None:
    """With 30 s left on the broker's clock (minimum 60 s), neither ``peek``, ``get_token`` nor the
    token endpoint hands the cached token out: callers get a fresh one with at least 60 s left."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("at-first", None, expires_in=3600)),
        httpx.Response(200, json=v1_token("at-second", None, expires_in=7200)),
    ]
    broker = running.ctx.broker
    assert running.settings.min_token_ttl_seconds == 60
    account_id = await create(running)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    first_expires = r.json()["expires_in"]
    assert r.json()["access_token"] == "at-first"
    skew = first_expires - 30.0  # the broker's clock moves to 30 s before at-first expires
    broker.clock = lambda: time.time() + skew

    for min_ttl in (0, 10):
        assert broker.peek(account_id, broker.need_for(min_ttl)) is None
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == "at-second"
    assert r.json()["expires_in"] >= 60
    entry = await broker.get_token(account_id)
    assert entry.access_token == "at-second"
    assert entry.expires_at - broker.clock() >= 60
    assert route.call_count == 2
