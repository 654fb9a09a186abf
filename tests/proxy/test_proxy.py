"""The proxy through the whole ASGI stack, Azure AD and the Web API mocked at the HTTP edge (respx).

Every test asserts what went upstream, not only what came back.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service import migrate
from service.kit import timeutil
from service.proxy import repository as proxy_repo
from service.tokens.response import CachedToken
from tests.conftest import (
    ADMIN_KEY,
    API_URL,
    CLIENT_KEY,
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

PROBLEM = "application/problem+json"
HOST = "contoso.crm.dynamics.com"


@pytest.fixture
async def app(tmp_path: Path, sqlite_url: str, run_app: Callable[..., Any]) -> AsyncIterator[Running]:
    await migrate.upgrade(sqlite_url)
    settings = make_settings(sqlite_url, tmp_path, proxy_max_concurrent=32, proxy_max_wait_seconds=5)
    async with run_app(settings) as running:
        yield running


async def new_account(running: Running) -> str:
    r = await running.client.post("/accounts", json=account_body(), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


def tokens(azure: respx.MockRouter, *access: str) -> respx.Route:
    """The token endpoint answers these access tokens in turn (the last one from then on)."""
    answers = [httpx.Response(200, json=v1_token(access=a, refresh=f"rt-{a}")) for a in access]

    def answer(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    return azure.post(TOKEN_URL_V1).mock(side_effect=answer)


# -- forwarding -------------------------------------------------------------------------------------


async def test_a_get_is_forwarded_with_the_accounts_token_and_comes_back_as_it_is(
    app: Running, azure: respx.MockRouter
) -> None:
    """Path and query reach {api_url}/{path}; the caller's key, cookie and hop headers do not; status,
    headers and body come back unchanged."""
    tokens(azure, "at-1")
    account = await new_account(app)
    upstream = azure.get(url__startswith=f"{API_URL}/accounts").respond(
        404,
        json={"error": {"code": "0x80040217", "message": "account Does Not Exist"}},
        headers={"odata-version": "4.0", "x-ms-service-request-id": "abc", "set-cookie": "ARRAffinity=1"},
    )
    r = await app.client.get(
        f"/accounts/{account}/api/accounts(00000000-0000-0000-0000-000000000001)?$select=name,revenue&$top=1",
        headers={
            **client(),
            "cookie": "s=caller",
            "connection": "x-hop",
            "x-hop": "1",
            "prefer": "return=representation",
        },
    )
    assert r.status_code == 404
    assert r.json() == {"error": {"code": "0x80040217", "message": "account Does Not Exist"}}
    assert r.headers["odata-version"] == "4.0"
    assert r.headers["set-cookie"] == "ARRAffinity=1"
    sent = upstream.calls.last.request
    assert str(sent.url) == (
        f"{API_URL}/accounts(00000000-0000-0000-0000-000000000001)?$select=name,revenue&$top=1"
    )
    assert sent.headers["authorization"] == "Bearer at-1"
    assert sent.headers["host"] == HOST
    assert sent.headers["prefer"] == "return=representation"
    assert "cookie" not in sent.headers
    assert "x-hop" not in sent.headers
    assert CLIENT_KEY not in str(sent.headers.raw)
    assert ADMIN_KEY not in str(sent.headers.raw)


async def test_a_post_body_goes_upstream_and_a_redirect_is_not_followed(
    app: Running, azure: respx.MockRouter
) -> None:
    """A JSON body larger than the admin API's 64 KiB limit is forwarded whole; a 302 comes back as it is."""
    tokens(azure, "at-1")
    account = await new_account(app)
    created = azure.post(f"{API_URL}/contacts").respond(
        302, headers={"location": "https://elsewhere.example/x", "odata-entityid": "c1"}
    )
    body = json.dumps({"description": "x" * 200_000}).encode()
    r = await app.client.post(
        f"/accounts/{account}/api/contacts",
        content=body,
        headers={**admin(), "content-type": "application/json"},
    )
    assert r.status_code == 302
    assert r.headers["location"] == "https://elsewhere.example/x"
    assert created.calls.last.request.content == body
    assert created.call_count == 1  # and nothing went to elsewhere.example: the router is strict


@pytest.mark.parametrize(
    "raw",
    ["%2e%2e/%2e%2e/x", "a%2fb", "a%5Cb", "..%2f..%2fx", "%2F%2Fevil.example/x", "https:%2F%2Fevil.example"],
)
async def test_a_path_escape_is_400_and_nothing_is_sent(
    app: Running, azure: respx.MockRouter, raw: str
) -> None:
    """Encoded dot segments and slashes: 400 invalid_path problem+json, no upstream call, no token fetched."""
    account = await new_account(app)
    url = httpx.URL(f"http://broker.test/accounts/{account}/api/").copy_with(
        raw_path=f"/accounts/{account}/api/{raw}".encode()
    )
    r = await app.client.get(url, headers=admin())
    assert r.status_code == 400, r.text
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "invalid_path"
    assert not azure.calls


async def test_access_is_the_token_endpoints(app: Running, azure: respx.MockRouter) -> None:
    """No key 401, a scoped key outside its scope gets what a missing account gets (404), inside it 200."""
    tokens(azure, "at-1")
    inside, outside = await new_account(app), await new_account(app)
    made = await app.client.post(
        "/keys", json={"name": "s", "role": "client", "accounts": [inside]}, headers=admin()
    )
    scoped = {"Authorization": f"Bearer {made.json()['key']}"}
    azure.get(f"{API_URL}/WhoAmI").respond(200, json={"UserId": "u"})
    assert (await app.client.get(f"/accounts/{inside}/api/WhoAmI")).status_code == 401
    assert (await app.client.get(f"/accounts/{inside}/api/WhoAmI", headers=scoped)).status_code == 200
    far = await app.client.get(f"/accounts/{outside}/api/WhoAmI", headers=scoped)
    absent = await app.client.get("/accounts/no-such-account/api/WhoAmI", headers=scoped)
    assert far.status_code == absent.status_code == 404
    assert {k: v for k, v in far.json().items() if k != "instance"} == {
        k: v for k, v in absent.json().items() if k != "instance"
    }
    missing = await app.client.delete("/accounts/no-such-account/api/WhoAmI", headers=admin())
    assert missing.status_code == 404
    assert missing.json()["code"] == "account_not_found"


# -- bodies -----------------------------------------------------------------------------------------


async def test_a_body_over_the_proxy_limit_is_413(
    tmp_path: Path, sqlite_url: str, run_app: Callable[..., Any], azure: respx.MockRouter
) -> None:
    """By Content-Length before reading, and by counting a streamed body without one: 413, nothing sent."""
    await migrate.upgrade(sqlite_url)
    async with run_app(make_settings(sqlite_url, tmp_path, proxy_max_body_bytes=2 * 1024 * 1024)) as running:
        tokens(azure, "at-1")
        account = await new_account(running)
        upstream = azure.post(f"{API_URL}/annotations").respond(204)
        big = b"x" * (2 * 1024 * 1024 + 1)
        r = await running.client.post(f"/accounts/{account}/api/annotations", content=big, headers=admin())
        assert r.status_code == 413
        assert r.json()["code"] == "payload_too_large"

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"y" * 65_536

        r = await running.client.post(
            f"/accounts/{account}/api/annotations", content=chunks(), headers=admin()
        )
        assert r.status_code == 413
        assert r.json()["code"] == "payload_too_large"
        ok = await running.client.post(
            f"/accounts/{account}/api/annotations", content=b"z" * 1_500_000, headers=admin()
        )
        assert ok.status_code == 204
        assert upstream.calls.last.request.content == b"z" * 1_500_000
        assert all(len(c.request.content) <= 2 * 1024 * 1024 for c in upstream.calls if c.request.content)


# -- 401 ------------------------------------------------------------------------------------------


async def test_many_callers_rejected_together_cost_one_refresh_and_each_is_resent_once(
    app: Running, azure: respx.MockRouter
) -> None:
    """20 callers whose token upstream revoked: all 401s held until all arrived, one refresh, 20 x 200."""
    token_route = tokens(azure, "at-old", "at-new")
    account = await new_account(app)
    callers = 20
    rejected = 0
    all_rejected = asyncio.Event()

    async def api(request: httpx.Request) -> httpx.Response:
        nonlocal rejected
        if request.headers["authorization"] == "Bearer at-old":
            rejected += 1
            if rejected == callers:
                all_rejected.set()
            await all_rejected.wait()
            return httpx.Response(401, headers={"www-authenticate": "Bearer"})
        return httpx.Response(200, json={"value": []})

    upstream = azure.get(f"{API_URL}/contacts").mock(side_effect=api)
    results = await asyncio.gather(
        *(app.client.get(f"/accounts/{account}/api/contacts", headers=client()) for _ in range(callers))
    )
    assert [r.status_code for r in results] == [200] * callers
    assert token_route.call_count == 2  # the first token, then exactly one forced refresh
    assert upstream.call_count == 2 * callers  # each sent twice: once rejected, once resent
    assert app.ctx.proxy.renewer.forced == 1
    metrics = (await app.client.get("/metrics")).text
    assert f'broker_proxy_requests_total{{outcome="refreshed_retry"}} {float(callers)}' in metrics
    # A caller who saw the old token rejected after the refresh gets the new token, no second refresh.
    later = await app.ctx.proxy.renewer.renew(
        account, CachedToken(account, "at-old", 0.0, 0.0, 0, API_URL, 0.0)
    )
    assert later.access_token == "at-new"
    assert token_route.call_count == 2


async def test_a_401_for_a_streamed_body_goes_back_and_the_next_request_has_a_new_token(
    app: Running, azure: respx.MockRouter
) -> None:
    """A 2 MiB upload cannot be resent: its 401 is returned; the refresh still happens, once."""
    token_route = tokens(azure, "at-old", "at-new")
    account = await new_account(app)

    def api(request: httpx.Request) -> httpx.Response:
        ok = request.headers["authorization"] == "Bearer at-new"
        return httpx.Response(204 if ok else 401)

    upstream = azure.post(f"{API_URL}/annotations").mock(side_effect=api)
    big = b"p" * (2 * 1024 * 1024)
    first = await app.client.post(f"/accounts/{account}/api/annotations", content=big, headers=admin())
    assert first.status_code == 401
    for _ in range(50):
        if token_route.call_count == 2 and not app.ctx.proxy.renewer.in_flight:
            break
        await asyncio.sleep(0.01)
    second = await app.client.post(f"/accounts/{account}/api/annotations", content=big, headers=admin())
    assert second.status_code == 204
    assert upstream.call_count == 2
    assert token_route.call_count == 2


# -- throttling -----------------------------------------------------------------------------------


async def test_an_upstream_429_pauses_the_account_here_and_in_the_database(
    app: Running, azure: respx.MockRouter
) -> None:
    """429 Retry-After 30 goes back as it is; the next caller gets 429 at once with nothing sent; the
    pause is stored for the other replicas; other accounts go on."""
    tokens(azure, "at-1")
    account, other = await new_account(app), await new_account(app)
    upstream = azure.get(f"{API_URL}/contacts").respond(
        429,
        headers={"retry-after": "30"},
        json={"error": {"code": "0x80072322", "message": "Number of requests exceeded"}},
    )
    first = await app.client.get(f"/accounts/{account}/api/contacts", headers=client())
    assert first.status_code == 429
    assert first.json()["error"]["code"] == "0x80072322"
    second = await app.client.get(f"/accounts/{account}/api/contacts", headers=client())
    assert second.status_code == 429
    assert second.headers["content-type"] == PROBLEM
    assert second.json()["reason"] == "upstream_pause"
    assert 29 <= int(second.headers["retry-after"]) <= 30
    assert upstream.call_count == 1
    await app.ctx.proxy.sync.close()  # the pause write has landed
    async with app.ctx.sessions() as session:
        stored = dict(await proxy_repo.active_pauses(session, timeutil.utcnow()))
    assert set(stored) == {account}
    azure.get(f"{API_URL}/WhoAmI").respond(200, json={})
    assert (await app.client.get(f"/accounts/{other}/api/WhoAmI", headers=client())).status_code == 200
    metrics = (await app.client.get("/metrics")).text
    assert "broker_proxy_paused_accounts 1.0" in metrics
    assert 'broker_proxy_requests_total{outcome="throttled_upstream"} 1.0' in metrics
    assert 'broker_proxy_requests_total{outcome="throttled_local"} 1.0' in metrics


async def test_a_pause_another_replica_stored_is_honoured_after_one_poll(
    app: Running, azure: respx.MockRouter
) -> None:
    """A pause row written by another replica: after one poll this replica sends nothing for the account."""
    tokens(azure, "at-1")
    account = await new_account(app)
    upstream = azure.get(f"{API_URL}/contacts").respond(200, json={"value": []})
    assert (await app.client.get(f"/accounts/{account}/api/contacts", headers=client())).status_code == 200
    async with app.ctx.sessions() as session:
        await proxy_repo.extend_pause(
            session, account, timeutil.from_epoch(timeutil.to_epoch(timeutil.utcnow()) + 60)
        )
        await proxy_repo.extend_pause(session, account, timeutil.utcnow())  # an older one changes nothing
        await session.commit()
    await app.ctx.proxy.sync.poll_once()
    r = await app.client.get(f"/accounts/{account}/api/contacts", headers=client())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 59
    assert upstream.call_count == 1


# -- network errors -------------------------------------------------------------------------------


async def test_a_get_is_retried_once_after_a_connection_error_and_a_post_is_not(
    app: Running, azure: respx.MockRouter
) -> None:
    """GET: connect error then 200 -> 200; POST: connect error -> 502 problem+json; timeouts -> 502, once."""
    tokens(azure, "at-1")
    account = await new_account(app)
    get = azure.get(f"{API_URL}/contacts").mock(
        side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json={"value": []})]
    )
    assert (await app.client.get(f"/accounts/{account}/api/contacts", headers=admin())).status_code == 200
    assert get.call_count == 2
    post = azure.post(f"{API_URL}/contacts").mock(side_effect=httpx.ConnectError("refused"))
    r = await app.client.post(f"/accounts/{account}/api/contacts", json={}, headers=admin())
    assert r.status_code == 502
    assert r.headers["content-type"] == PROBLEM
    assert r.json()["code"] == "upstream_error"
    assert post.call_count == 1
    slow = azure.get(f"{API_URL}/slow").mock(side_effect=httpx.ReadTimeout("slow"))
    assert (await app.client.get(f"/accounts/{account}/api/slow", headers=admin())).status_code == 502
    assert slow.call_count == 1
    assert app.ctx.proxy.pacer.in_flight(account) == 0  # every place came back


# -- observability --------------------------------------------------------------------------------


async def test_one_access_log_line_per_proxied_request_without_query_or_secrets(
    app: Running, azure: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """account id, method, path (no query), status and duration; never the query, the key or the token."""
    tokens(azure, "at-secret-token")
    account = await new_account(app)
    azure.get(f"{API_URL}/contacts").respond(200, json={"value": []})
    with caplog.at_level(logging.INFO):
        r = await app.client.get(f"/accounts/{account}/api/contacts?$filter=secret-query", headers=client())
    assert r.status_code == 200
    lines = [rec for rec in caplog.records if rec.name == "service.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line.account_id == account
    assert line.method == "GET"
    assert line.status == 200
    assert line.path == f"/accounts/{account}/api/contacts"  # type: ignore[attr-defined]
    assert line.duration_ms >= 0  # type: ignore[attr-defined]
    # The service's own loggers (httpx logs URLs at INFO; logconfig.configure silences it in service).
    ours = [rec for rec in caplog.records if rec.name.startswith("service")]
    text = " ".join(f"{rec.getMessage()} {rec.__dict__}" for rec in ours)
    for secret in ("secret-query", "at-secret-token", CLIENT_KEY):
        assert secret not in text


async def test_the_documented_route_answers_as_the_edge_in_front_of_fastapi(
    app: Running, azure: respx.MockRouter
) -> None:
    """The FastAPI route (what OpenAPI documents) and the ASGI edge give the same answers."""
    tokens(azure, "at-1")
    account = await new_account(app)
    azure.get(f"{API_URL}/WhoAmI").respond(200, json={"UserId": "u"}, headers={"x-ms-id": "1"})
    route = httpx.AsyncClient(transport=httpx.ASGITransport(app=app.app), base_url="http://broker.test")
    async with route:
        for path in (
            f"/accounts/{account}/api/WhoAmI",
            "/accounts/nope/api/WhoAmI",
            f"/accounts/{account}/api/a%2fb",
        ):
            by_route = await route.get(path, headers=client())
            by_edge = await app.client.get(path, headers=client())
            assert by_route.status_code == by_edge.status_code
            assert by_route.content == by_edge.content
            assert by_route.headers.get("content-type") == by_edge.headers.get("content-type")


async def test_other_methods_are_405_and_nothing_is_sent(app: Running, azure: respx.MockRouter) -> None:
    """HEAD, OPTIONS and TRACE are not proxied: 405 from the routes, no upstream call."""
    account = await new_account(app)
    for method in ("HEAD", "OPTIONS", "TRACE"):
        r = await app.client.request(method, f"/accounts/{account}/api/WhoAmI", headers=client())
        assert r.status_code == 405, method
    assert not azure.calls


async def test_compressed_bodies_come_back_raw_small_or_streamed(
    app: Running, azure: respx.MockRouter
) -> None:
    """gzip bytes with Content-Encoding pass through untouched, read whole (small) or streamed (large)."""
    import gzip

    tokens(azure, "at-1")
    account = await new_account(app)
    small, large = gzip.compress(b'{"value": []}'), gzip.compress(bytes(range(256)) * 4096, compresslevel=0)
    assert len(large) > 64 * 1024
    for name, body in (("small", small), ("large", large)):
        upstream = azure.get(f"{API_URL}/{name}").respond(
            200, content=body, headers={"content-encoding": "gzip", "content-type": "application/json"}
        )
        headers = {**client(), "accept-encoding": "gzip"}
        async with app.client.stream("GET", f"/accounts/{account}/api/{name}", headers=headers) as r:
            raw = b"".join([chunk async for chunk in r.aiter_raw()])
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert upstream.calls.last.request.headers["accept-encoding"] == "gzip"
        assert raw == body
    assert app.ctx.proxy.pacer.in_flight(account) == 0
