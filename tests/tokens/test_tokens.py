"""Token issuance through the app: cache, single-flight, errors, lifecycle (SQLite and MariaDB)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import respx

from service.accounts import repository as accounts_repo
from service.kit import sealing, timeutil
from service.models import Account
from service.tokens.broker import TokenBroker
from tests.conftest import (
    API_URL,
    CLIENT_SECRET,
    REFRESH_TOKEN,
    TOKEN_URL_V1,
    TOKEN_URL_V2,
    account_body,
    admin,
    client,
    v1_token,
)


class Held:
    """A fake token response held open until released; counts the requests that reached it."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.release = asyncio.Event()
        self.arrived = 0
        self.responses = list(responses)

    async def __call__(self, _request: httpx.Request) -> httpx.Response:
        self.arrived += 1
        await self.release.wait()
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]

    async def until_arrived(self, count: int = 1) -> None:
        while self.arrived < count:
            await asyncio.sleep(0)


def form(request: httpx.Request) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(request.content.decode()).items()}


async def create(running: Any, **overrides: Any) -> str:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


async def stored_refresh_token(running: Any, account_id: str) -> str:
    async with running.ctx.sessions() as session:
        account = await session.get(Account, account_id)
        assert account is not None
        value = sealing.unseal(running.ctx.keyring, sealing.REFRESH_TOKEN, account_id, account.refresh_token)
        assert value is not None
        return value


async def test_first_request_refreshes_then_serves_from_memory(running: Any, azure: respx.MockRouter) -> None:
    """The first call redeems the refresh token (v1 form exactly), later calls touch no IdP."""
    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token("at-1", "rt-2"))
    account_id = await create(running)
    first = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["access_token"] == "at-1"
    assert body["token_type"] == "Bearer"
    assert body["account_id"] == account_id
    assert body["api_url"] == API_URL
    assert 3500 < body["expires_in"] <= 3599
    assert body["expires_at"].endswith("Z")
    assert first.headers["cache-control"] == "no-store"
    assert form(route.calls[0].request) == {
        "grant_type": "refresh_token",
        "client_id": "dc40e7c1-86fa-484e-a38b-bec0d31c945a",
        "client_secret": CLIENT_SECRET,
        "refresh_token": REFRESH_TOKEN,
        "resource": "https://contoso.crm.dynamics.com",
    }
    for _ in range(5):
        again = await running.client.get(f"/accounts/{account_id}/token", headers=client())
        assert again.json()["access_token"] == "at-1"
    assert route.call_count == 1
    assert await stored_refresh_token(running, account_id) == "rt-2"


async def test_v2_client_credentials_form(running: Any, azure: respx.MockRouter) -> None:
    """client_credentials on v2 sends scope=<origin>/.default and accepts a numeric expires_in."""
    route = azure.post(TOKEN_URL_V2).respond(
        200, json={"token_type": "Bearer", "expires_in": 3599, "access_token": "cc-token"}
    )
    account_id = await create(
        running, token_url=TOKEN_URL_V2, grant_type="client_credentials", refresh_token=None
    )
    r = await running.client.get(f"/accounts/{account_id}/token", headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == "cc-token"
    assert form(route.calls[0].request) == {
        "grant_type": "client_credentials",
        "client_id": "dc40e7c1-86fa-484e-a38b-bec0d31c945a",
        "client_secret": CLIENT_SECRET,
        "scope": "https://contoso.crm.dynamics.com/.default",
    }


async def test_thousand_concurrent_callers_cause_one_idp_call(running: Any, azure: respx.MockRouter) -> None:
    """1,000 callers of a cold account share one refresh, held open until all are waiting."""
    held = Held(httpx.Response(200, json=v1_token("shared", "rt-2")))
    route = azure.post(TOKEN_URL_V1).mock(side_effect=held)
    account_id = await create(running)
    broker = running.ctx.broker
    callers = [asyncio.create_task(broker.get_token(account_id)) for _ in range(1000)]
    await held.until_arrived()
    while running.ctx.metrics.refresh_waiters._value.get() < 1000:
        await asyncio.sleep(0)
    held.release.set()
    tokens = await asyncio.gather(*callers)
    assert {t.access_token for t in tokens} == {"shared"}
    assert route.call_count == 1


async def test_cancelled_first_caller_does_not_cancel_the_refresh(
    running: Any, azure: respx.MockRouter
) -> None:
    """The caller that started a refresh goes away; the others still get the token."""
    held = Held(httpx.Response(200, json=v1_token("survivor", "rt-2")))
    route = azure.post(TOKEN_URL_V1).mock(side_effect=held)
    account_id = await create(running)
    broker = running.ctx.broker
    first = asyncio.create_task(broker.get_token(account_id))
    await held.until_arrived()
    others = [asyncio.create_task(broker.get_token(account_id)) for _ in range(10)]
    await asyncio.sleep(0)
    first.cancel()
    held.release.set()
    results = await asyncio.gather(*others)
    assert {t.access_token for t in results} == {"survivor"}
    assert route.call_count == 1
    assert first.cancelled()
    assert await stored_refresh_token(running, account_id) == "rt-2"


async def test_error_reaches_every_waiter_and_next_call_retries(
    running: Any, azure: respx.MockRouter
) -> None:
    """A failed refresh fails all its waiters with the same error; it is not cached."""
    held = Held(
        httpx.Response(503, json={"error": "temporarily_unavailable"}),
        httpx.Response(200, json=v1_token("after", "rt-3")),
    )
    route = azure.post(TOKEN_URL_V1).mock(side_effect=held)
    account_id = await create(running)
    broker = running.ctx.broker
    waiters = [asyncio.create_task(broker.get_token(account_id)) for _ in range(50)]
    await held.until_arrived()
    held.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(type(r).__name__ == "UpstreamUnavailable" for r in results)
    assert route.call_count == 1
    r = await running.client.get(f"/accounts/{account_id}/token", headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == "after"
    assert route.call_count == 2


async def test_invalid_grant_needs_authorization_and_is_not_retried(
    running: Any, azure: respx.MockRouter
) -> None:
    """invalid_grant answers 409 needs_authorization; Azure is not asked again until a person acts."""
    route = azure.post(TOKEN_URL_V1).respond(
        400,
        json={
            "error": "invalid_grant",
            "error_description": (
                "AADSTS700082: The refresh token has expired due to inactivity.\r\nTrace ID: x"
            ),
            "error_codes": [700082],
        },
    )
    account_id = await create(running)
    for _ in range(3):
        r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
        assert r.status_code == 409
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["code"] == "needs_authorization"
        assert "authorize" in r.json()["detail"]
    assert route.call_count == 1
    got = (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()
    assert got["status"] == "needs_authorization"
    assert got["last_error"]["code"] == "invalid_grant"
    assert "AADSTS700082" in got["last_error"]["message"]
    # A new refresh token from an admin clears the block.
    route.respond(200, json=v1_token("fixed", None))
    patched = await running.client.patch(
        f"/accounts/{account_id}", json={"refresh_token": "rt-new"}, headers=admin()
    )
    assert patched.json()["status"] == "ready"
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.json()["access_token"] == "fixed"
    assert form(route.calls[-1].request)["refresh_token"] == "rt-new"
    assert await stored_refresh_token(running, account_id) == "rt-new"  # kept: none was returned


async def test_invalid_client_is_invalid_credentials(running: Any, azure: respx.MockRouter) -> None:
    """invalid_client answers 409 invalid_credentials and says to fix the secret."""
    azure.post(TOKEN_URL_V1).respond(
        401,
        json={
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided.",
        },
    )
    account_id = await create(running)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 409
    assert r.json()["code"] == "invalid_credentials"
    assert CLIENT_SECRET not in r.text
    got = (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()
    assert got["status"] == "invalid_credentials"


async def test_throttling_honours_retry_after(
    running: Any, azure: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """429 with Retry-After answers 503 with Retry-After, and Azure is not asked again meanwhile.

    The failure is logged once, with what an operator needs: account, code, status, wait."""
    caplog.set_level(logging.WARNING, logger="service")
    route = azure.post(TOKEN_URL_V1).respond(429, headers={"Retry-After": "30"}, json={"error": "throttled"})
    account_id = await create(running)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 503
    assert r.json()["code"] == "upstream_unavailable"
    assert 25 <= int(r.headers["retry-after"]) <= 30
    again = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert again.status_code == 503
    assert int(again.headers["retry-after"]) > 0
    assert route.call_count == 1
    got = (await running.client.get(f"/accounts/{account_id}", headers=admin())).json()
    assert got["status"] == "failing"
    failed = [r.__dict__ for r in caplog.records if r.getMessage() == "token refresh failed"]
    assert len(failed) == 1, failed
    assert failed[0]["account_id"] == account_id
    assert (failed[0]["code"], failed[0]["to_status"]) == ("throttled", "failing")
    assert 25 <= failed[0]["retry_after"] <= 30


async def test_inside_margin_serves_cached_and_refreshes_once_in_background(
    running: Any, azure: respx.MockRouter
) -> None:
    """A token inside the margin is served at once while one background refresh replaces it."""
    held = Held(httpx.Response(200, json=v1_token("long", "rt-3")))
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [httpx.Response(200, json=v1_token("short", "rt-2", expires_in=200)), held]
    account_id = await create(running)
    first = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert first.json()["access_token"] == "short"
    stale = [await running.client.get(f"/accounts/{account_id}/token", headers=client()) for _ in range(20)]
    assert {s.json()["access_token"] for s in stale} == {"short"}
    await held.until_arrived()
    assert held.arrived == 1
    held.release.set()
    while running.ctx.broker.refreshes_in_flight:
        await asyncio.sleep(0.01)
    fresh = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert fresh.json()["access_token"] == "long"
    assert route.call_count == 2


async def test_token_shorter_than_min_ttl_is_an_upstream_error(running: Any, azure: respx.MockRouter) -> None:
    """A refresh returning a token inside BROKER_MIN_TOKEN_TTL_SECONDS is never handed out."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("tiny", "rt-2", expires_in=30))
    account_id = await create(running)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 503
    assert "tiny" not in r.text


async def test_min_ttl_forces_a_refresh_and_accepts_shorter_azure_lifetime(
    running: Any, azure: respx.MockRouter
) -> None:
    """?min_ttl above what is left refreshes; the fresh token is returned even if shorter than asked."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("first", "rt-2", expires_in=1000)),
        httpx.Response(200, json=v1_token("second", "rt-3", expires_in=1500)),
    ]
    account_id = await create(running)
    assert (await running.client.get(f"/accounts/{account_id}/token", headers=client())).json()[
        "access_token"
    ] == ("first")
    r = await running.client.get(f"/accounts/{account_id}/token?min_ttl=2000", headers=client())
    assert r.status_code == 200
    assert r.json()["access_token"] == "second"
    assert route.call_count == 2
    bad = await running.client.get(f"/accounts/{account_id}/token?min_ttl=4000", headers=client())
    assert bad.status_code == 422
    assert bad.json()["code"] == "validation_error"


async def test_default_resolves_and_missing_account_is_404(running: Any, azure: respx.MockRouter) -> None:
    """`default` names the default account; an unknown id is 404 account_not_found."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("dflt", "rt-2"))
    missing = await running.client.get("/accounts/default/token", headers=client())
    assert missing.status_code == 404
    account_id = await create(running, default_account=True)
    r = await running.client.get("/accounts/default/token", headers=client())
    assert r.status_code == 200
    assert r.json()["account_id"] == account_id
    assert (await running.client.get("/accounts/default/token", headers=client())).status_code == 200
    nope = await running.client.get("/accounts/nope/token", headers=client())
    assert nope.status_code == 404
    assert nope.json()["code"] == "account_not_found"


async def test_no_refresh_token_needs_authorization_without_idp_call(
    running: Any, azure: respx.MockRouter
) -> None:
    """An account never authorized answers 409 needs_authorization and calls nobody."""
    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token())
    account_id = await create(running, refresh_token=None)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 409
    assert r.json()["code"] == "needs_authorization"
    assert route.call_count == 0


async def test_restarted_app_serves_stored_token_without_idp(
    settings: Any, run_app: Any, azure: respx.MockRouter
) -> None:
    """A new process finds the encrypted access token in the database and serves it."""
    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token("persisted", "rt-2"))
    async with run_app(settings) as first:
        account_id = await create(first)
        assert (await first.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    async with run_app(settings) as second:
        r = await second.client.get(f"/accounts/{account_id}/token", headers=client())
        assert r.json()["access_token"] == "persisted"
    assert route.call_count == 1


async def test_database_down_serves_cache_and_never_redeems(running: Any, azure: respx.MockRouter) -> None:
    """With the database unreachable, cached tokens flow; a miss is 503 and Azure is not called."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token("cached", "rt-2"))
    cached = await create(running)
    cold = await create(running)
    assert (await running.client.get(f"/accounts/{cached}/token", headers=client())).status_code == 200
    dead = create_async_engine(
        "mysql+aiomysql://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    ctx = running.ctx
    live = ctx.broker
    # The same cache, over a database that cannot be reached.
    ctx.broker = TokenBroker(
        sessions=async_sessionmaker(dead),
        azure=ctx.azure,
        keyring=ctx.keyring,
        secrets=ctx.secrets,
        settings=ctx.settings,
        metrics=ctx.metrics,
        cache=live.cache,
    )
    try:
        ok = await running.client.get(f"/accounts/{cached}/token", headers=client())
        assert ok.json()["access_token"] == "cached"
        down = await running.client.get(f"/accounts/{cold}/token", headers=client())
        assert down.status_code == 503
        assert down.json()["code"] == "storage_unavailable"
        assert "retry-after" in down.headers
        assert route.call_count == 1
    finally:
        ctx.broker = live
        await dead.dispose()


async def test_changing_credentials_drops_the_cached_token(running: Any, azure: respx.MockRouter) -> None:
    """PATCHing a credential field makes the next call refresh with the new value."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("old", "rt-2")),
        httpx.Response(200, json=v1_token("new", "rt-3")),
    ]
    account_id = await create(running)
    await running.client.get(f"/accounts/{account_id}/token", headers=client())
    await running.client.patch(
        f"/accounts/{account_id}", json={"client_secret": "another-secret"}, headers=admin()
    )
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.json()["access_token"] == "new"
    assert form(route.calls[1].request)["client_secret"] == "another-secret"


async def test_deleted_account_token_is_gone(running: Any, azure: respx.MockRouter) -> None:
    """After DELETE the token endpoint answers 404, even for a token that was cached."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("doomed", "rt-2"))
    account_id = await create(running)
    await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert (await running.client.delete(f"/accounts/{account_id}", headers=admin())).status_code == 204
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code == 404


async def test_token_endpoint_auth(running: Any, azure: respx.MockRouter) -> None:
    """No key or a wrong key is 401 with WWW-Authenticate, also on the fast path."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("x", "rt-2"))
    account_id = await create(running)
    await running.client.get(f"/accounts/{account_id}/token", headers=client())
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = await running.client.get(f"/accounts/{account_id}/token", headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "access_token" not in r.text


async def test_events_record_refreshes_and_status(running: Any, azure: respx.MockRouter) -> None:
    """A refresh and a failure are in the account's history with their classification."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("a", "rt-2", expires_in=3599)),
        httpx.Response(400, json={"error": "invalid_grant", "error_description": "AADSTS50173: revoked"}),
    ]
    account_id = await create(running)
    await running.client.get(f"/accounts/{account_id}/token", headers=client())
    await running.client.get(f"/accounts/{account_id}/token?min_ttl=3600", headers=client())
    events = (await running.client.get(f"/accounts/{account_id}/events", headers=admin())).json()["items"]
    kinds = [e["kind"] for e in events]
    assert kinds[:3] == ["status_changed", "refresh_failed", "token_refreshed"]
    assert kinds[-1] == "created"
    assert json.dumps(events).find("rt-2") == -1


@pytest.mark.parametrize("query", ["min_ttl=-1", "min_ttl=abc", "min_ttl=3601"])
async def test_bad_min_ttl_is_422(running: Any, query: str) -> None:
    """min_ttl outside 0-3600 is a validation error."""
    r = await running.client.get(f"/accounts/x/token?{query}", headers=client())
    assert r.status_code == 422


async def test_keepalive_refreshes_idle_accounts_once(
    settings: Any, run_app: Any, azure: respx.MockRouter
) -> None:
    """An account idle past the keepalive interval is refreshed once, even with two replicas at it."""
    from datetime import timedelta

    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("a", "rt-2")),
        httpx.Response(200, json=v1_token("b", "rt-3")),
    ]
    async with run_app(settings) as one, run_app(settings) as two:
        account_id = await create(one)
        client_only = await create(one, grant_type="client_credentials", refresh_token=None)
        assert (await one.client.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
        assert await one.ctx.background.keepalive_once() == 0  # refreshed just now: nothing to do
        async with one.ctx.sessions() as session:
            old = timeutil.utcnow() - timedelta(days=2)
            await accounts_repo.update_state(session, account_id, {"last_refreshed_at": old})
            await session.commit()
        # Two replicas at once on MySQL (the row lock decides); SQLite serves one process only.
        replicas = [one.ctx] if settings.is_sqlite else [one.ctx, two.ctx]
        done = await asyncio.gather(*(ctx.background.keepalive_once() for ctx in replicas))
        assert sum(done) >= 1
        assert route.call_count == 2
        assert await stored_refresh_token(one, account_id) == "rt-3"
        assert all(not c.request.content.decode().count(client_only) for c in route.calls)


async def test_database_failing_after_azure_answered_serves_and_counts_the_loss(
    running: Any, azure: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the result cannot be stored, the valid access token is still served and the loss counted."""
    from sqlalchemy.exc import OperationalError

    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("unsaved", "rt-rotated"))
    account_id = await create(running)

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise OperationalError("UPDATE broker_account_state", {}, Exception("server has gone away"))

    monkeypatch.setattr(accounts_repo, "update_state", broken)
    r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
    monkeypatch.undo()
    assert r.status_code == 200
    assert r.json()["access_token"] == "unsaved"
    assert running.ctx.metrics.refresh_token_unsaved._value.get() == 1
    assert await stored_refresh_token(running, account_id) == REFRESH_TOKEN  # rolled back, not half-written


def test_refresh_in_counts_down_to_the_refresh_and_stops_at_zero() -> None:
    """The pre-encoded body carries refresh_in = max(0, int(refresh_at - now)), rebuilt when it changes."""
    from service.tokens.response import CachedToken

    entry = CachedToken("acc", "tok", 1000.0, 700.5, 1, API_URL, 0.0)
    seen = [json.loads(entry.body(now)) for now in (100.0, 100.4, 100.6, 700.4, 700.6, 990.0)]
    assert [(b["expires_in"], b["refresh_in"]) for b in seen] == [
        (900, 600),
        (899, 600),
        (899, 599),  # same expires_in, new refresh_in: the once-a-second body is rebuilt
        (299, 0),
        (299, 0),
        (10, 0),
    ]
    body, headers = entry.response(100.6)
    assert dict(headers)[b"content-length"] == str(len(body)).encode()


async def test_refresh_in_on_the_route_and_the_fast_path_with_a_fake_clock(
    running: Any, azure: respx.MockRouter
) -> None:
    """Miss (route) and hit (fast path) answer refresh_in from the broker's clock and refresh_at."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(200, json=v1_token("at-1", "rt-2", expires_in=3599)),
        httpx.Response(200, json=v1_token("at-2", "rt-3", expires_in=3599)),
    ]
    broker = running.ctx.broker
    now = [float(int(time.time()))]
    broker.clock = lambda: now[0]
    account_id = await create(running)
    url = f"/accounts/{account_id}/token"
    miss = (await running.client.get(url, headers=client())).json()
    entry = broker.cache.get(account_id)
    assert entry is not None
    margin = running.ctx.settings.refresh_margin_seconds
    assert entry.expires_at - margin <= entry.refresh_at <= entry.expires_at - 0.8 * margin
    assert miss["refresh_in"] == int(entry.refresh_at - now[0])
    assert miss["expires_in"] == int(entry.expires_at - now[0])
    assert 0 < miss["refresh_in"] < miss["expires_in"]
    now[0] += 100.0
    hit = (await running.client.get(url, headers=client())).json()
    assert hit["access_token"] == "at-1"
    assert hit["refresh_in"] == int(entry.refresh_at - now[0]) == miss["refresh_in"] - 100
    assert route.call_count == 1
    now[0] = entry.refresh_at + 1  # due: served stale with refresh_in 0 while the refresh runs
    stale = (await running.client.get(url, headers=client())).json()
    assert stale["access_token"] == "at-1"
    assert stale["refresh_in"] == 0
    while broker.refreshes_in_flight:
        await asyncio.sleep(0.01)
    fresh = (await running.client.get(url, headers=client())).json()
    assert fresh["access_token"] == "at-2"
    assert fresh["refresh_in"] == max(0, int(broker.cache.get(account_id).refresh_at - now[0]))
    assert set(fresh) == {"access_token", "token_type", "expires_in", "refresh_in", "expires_at"} | {
        "api_url",
        "account_id",
    }
