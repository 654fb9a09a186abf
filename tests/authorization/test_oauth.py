"""Authorizing accounts through the ASGI app: the hosted callback, the pasted code, and the test.

Azure AD and Dynamics are mocked at the HTTP edge by the strict ``azure`` respx router; every
test that uses ``running`` runs on SQLite and on MariaDB.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx
import pytest
import respx
from sqlalchemy import update

from service.authorization import repository as pending_repo
from service.authorization.endpoints import _prefers_json
from service.authorization.redirects import parse_pasted, redirect_uri_problem, s256
from service.errors import InvalidInput
from service.kit import timeutil
from service.models import PendingAuthorization
from tests.conftest import (
    API_URL,
    AUTHORIZE_URL_V2,
    CLIENT_SECRET,
    TOKEN_URL_V1,
    TOKEN_URL_V2,
    account_body,
    admin,
    v1_token,
)

ORIGIN = "https://contoso.crm.dynamics.com"
CLIENT_ID = account_body()["client_id"]
DEFAULT_REDIRECT = "http://127.0.0.1:8080/oauth/callback"  # {BROKER_PUBLIC_URL}/oauth/callback
CODE = "0.AQ8A-one-time-authorization-code_value"
ACCESS = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-token-from-the-code"
REFRESH = "0.AQ8A-refresh-token-from-the-code"
WHOAMI = f"{API_URL}/WhoAmI"
IDS = {
    "UserId": "a1a2a3a4-0000-0000-0000-000000000002",
    "OrganizationId": "c1c2c3c4-0000-0000-0000-000000000003",
    "BusinessUnitId": "b1b2b3b4-0000-0000-0000-000000000001",
}
AADSTS501481 = {
    "error": "invalid_grant",
    "error_description": "AADSTS501481: The Code_Verifier does not match the code_challenge supplied in "
    "the authorization request.\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2024-01-01",
    "error_codes": [501481],
}
JSON = {"Accept": "application/json"}


def query(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def form(request: httpx.Request) -> dict[str, str]:
    return dict(parse_qsl(request.content.decode(), keep_blank_values=True))


async def create(running: Any, **overrides: Any) -> dict[str, Any]:
    """An authorization-code account without a refresh token, unless overridden."""
    r = await running.client.post(
        "/accounts", json=account_body(**{"refresh_token": None, **overrides}), headers=admin()
    )
    assert r.status_code == 201, r.text
    account: dict[str, Any] = r.json()
    return account


async def authorize(running: Any, account_id: str, **body: Any) -> dict[str, Any]:
    r = await running.client.post(f"/accounts/{account_id}/authorize", json=body or None, headers=admin())
    assert r.status_code == 200, r.text
    started: dict[str, Any] = r.json()
    return started


async def account(running: Any, account_id: str) -> dict[str, Any]:
    r = await running.client.get(f"/accounts/{account_id}", headers=admin())
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()
    return got


async def kinds(running: Any, account_id: str) -> list[str]:
    r = await running.client.get(f"/accounts/{account_id}/events", headers=admin())
    assert r.status_code == 200, r.text
    return [e["kind"] for e in r.json()["items"]]


def token_route(azure: respx.MockRouter, url: str = TOKEN_URL_V1) -> respx.Route:
    return azure.post(url).respond(200, json=v1_token(access=ACCESS, refresh=REFRESH))


@dataclass
class Seen:
    """Every response the test client receives: (path, headers, body)."""

    responses: list[tuple[str, str, str]] = field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        self.responses.append((response.request.url.path, headers, response.text))

    def containing(self, needle: str) -> list[str]:
        return [path for path, headers, body in self.responses if needle in headers or needle in body]


# -- the hosted flow --------------------------------------------------------------------------


async def test_hosted_flow_end_to_end(running: Any, azure: respx.MockRouter) -> None:
    """Authorize, the IdP redirect to /oauth/callback, then a cached token and a passing test."""
    created = await create(running)
    assert created["status"] == "needs_authorization"
    started = await authorize(running, created["id"])
    params = query(started["authorization_url"])
    assert started["authorization_url"].startswith(f"{account_body()['authorization_url']}?")
    assert params == {
        "response_type": "code",
        "client_id": CLIENT_ID,
        "redirect_uri": DEFAULT_REDIRECT,
        "state": started["state"],
        "resource": ORIGIN,
        "code_challenge": params["code_challenge"],
        "code_challenge_method": "S256",
    }
    assert CLIENT_SECRET not in started["authorization_url"]
    assert quote(CLIENT_SECRET, safe="") not in started["authorization_url"]
    assert "client_secret" not in started["authorization_url"]

    route = token_route(azure)
    page = await running.client.get(
        "/oauth/callback", params={"code": CODE, "state": started["state"], "session_state": "x"}
    )
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["content-security-policy"] == "default-src 'none'; style-src 'unsafe-inline'"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert created["name"] in page.text
    assert "close this window" in page.text

    sent = form(route.calls.last.request)
    verifier = sent.pop("code_verifier")
    assert sent == {
        "grant_type": "authorization_code",
        "code": CODE,
        "redirect_uri": DEFAULT_REDIRECT,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "resource": ORIGIN,
    }
    assert 43 <= len(verifier) <= 128
    assert s256(verifier) == params["code_challenge"]

    got = await account(running, created["id"])
    assert (got["status"], got["has_refresh_token"]) == ("ready", True)
    calls = len(azure.calls)
    token = await running.client.get(f"/accounts/{created['id']}/token", headers=admin())
    assert token.status_code == 200
    assert token.json()["access_token"] == ACCESS
    assert len(azure.calls) == calls  # served from the exchange's token: no further IdP call

    whoami = azure.get(WHOAMI).respond(200, json={"@odata.context": "x", **IDS})
    tested = await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    assert tested.status_code == 200
    assert tested.json()["ok"] is True
    assert tested.json()["user_id"] == IDS["UserId"]
    assert tested.json()["organization_id"] == IDS["OrganizationId"]
    assert tested.json()["business_unit_id"] == IDS["BusinessUnitId"]
    assert tested.json()["latency_ms"] >= 0
    assert whoami.calls.last.request.headers["Authorization"] == f"Bearer {ACCESS}"
    assert len(azure.calls) == calls + 1


async def test_v2_authorize_url_asks_for_scope(running: Any) -> None:
    """A v2 account's URL has scope=<origin>/.default offline_access and no resource."""
    created = await create(running, authorization_url=AUTHORIZE_URL_V2, token_url=TOKEN_URL_V2)
    started = await authorize(running, created["id"])
    params = query(started["authorization_url"])
    assert params["scope"] == f"{ORIGIN}/.default offline_access"
    assert "resource" not in params
    assert params["code_challenge_method"] == "S256"


async def test_authorize_without_body_and_with_a_redirect_uri(running: Any) -> None:
    """No body means the default callback; a given redirect_uri is used as it is."""
    created = await create(running)
    r = await running.client.post(f"/accounts/{created['id']}/authorize", headers=admin())
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert query(r.json()["authorization_url"])["redirect_uri"] == DEFAULT_REDIRECT
    started = await authorize(running, created["id"], redirect_uri="http://localhost")
    assert query(started["authorization_url"])["redirect_uri"] == "http://localhost"
    assert started["expires_at"].endswith("Z")
    assert "authorization_started" in await kinds(running, created["id"])


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "localhost",
        "/oauth/callback",
        "ftp://localhost/",
        "https://x.example/cb#frag",
        "https://x.example/c b",
        "https://user:pw@x.example/cb",
    ],
)
async def test_authorize_refuses_bad_redirect_uri(redirect_uri: str, running: Any) -> None:
    """A redirect_uri must be an absolute http(s) URL without fragment or userinfo: else 422."""
    created = await create(running)
    r = await running.client.post(
        f"/accounts/{created['id']}/authorize", json={"redirect_uri": redirect_uri}, headers=admin()
    )
    assert r.status_code == 422
    assert r.json()["code"] == "validation_error"
    assert r.json()["errors"][0]["loc"] == ["body", "redirect_uri"]


async def test_authorize_refusals(running: Any) -> None:
    """client_credentials accounts get 422, a missing account 404, no key 401."""
    cc = await create(running, grant_type="client_credentials")
    r = await running.client.post(f"/accounts/{cc['id']}/authorize", headers=admin())
    assert r.status_code == 422
    assert "client_credentials accounts need no authorization" in r.json()["detail"]
    r = await running.client.post("/accounts/nope/authorize", headers=admin())
    assert (r.status_code, r.json()["code"]) == (404, "account_not_found")
    r = await running.client.post(f"/accounts/{cc['id']}/authorize")
    assert r.status_code == 401


# -- bad states and refusals --------------------------------------------------------------------


async def test_replayed_state_is_refused(running: Any, azure: respx.MockRouter) -> None:
    """A state works once: the replay is a 400 invalid_state page, or problem+json on request."""
    created = await create(running)
    started = await authorize(running, created["id"])
    route = token_route(azure)
    first = await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    assert first.status_code == 200
    again = await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    assert again.status_code == 400
    assert again.headers["content-type"].startswith("text/html")
    assert again.headers["cache-control"] == "no-store"
    assert "invalid_state" in again.text
    assert "POST /accounts/{id}/authorize" in again.text
    as_json = await running.client.get(
        "/oauth/callback", params={"code": CODE, "state": started["state"]}, headers=JSON
    )
    assert as_json.status_code == 400
    assert as_json.headers["content-type"] == "application/problem+json"
    assert as_json.json()["code"] == "invalid_state"
    assert route.call_count == 1


async def test_expired_state_is_refused_and_consumed(running: Any, azure: respx.MockRouter) -> None:
    """A state older than ten minutes is invalid, and gone afterwards."""
    created = await create(running)
    started = await authorize(running, created["id"])
    async with running.ctx.sessions() as session, session.begin():
        await session.execute(
            update(PendingAuthorization).values(expires_at=timeutil.utcnow() - timedelta(seconds=1))
        )
    r = await running.client.get(
        "/oauth/callback", params={"code": CODE, "state": started["state"]}, headers=JSON
    )
    assert (r.status_code, r.json()["code"]) == (400, "invalid_state")
    async with running.ctx.sessions() as session:
        state_hash = hashlib.sha256(started["state"].encode()).hexdigest()
        assert await pending_repo.take_pending(session, state_hash) is None
    assert not azure.calls
    assert (await account(running, created["id"]))["status"] == "needs_authorization"


@pytest.mark.parametrize("params", [{"code": CODE, "state": "forged-state"}, {"code": CODE}, {}])
async def test_forged_or_missing_state_is_refused(
    params: dict[str, str], running: Any, azure: respx.MockRouter
) -> None:
    """A state the broker never issued (or none) is 400 invalid_state; Azure is not called."""
    await authorize(running, (await create(running))["id"])
    r = await running.client.get("/oauth/callback", params=params)
    assert r.status_code == 400
    assert "invalid_state" in r.text
    assert not azure.calls


async def test_idp_error_is_a_page_and_changes_nothing(running: Any, azure: respx.MockRouter) -> None:
    """error=access_denied consumes the state, answers 400 with the escaped reason, changes nothing."""
    created = await create(running)
    started = await authorize(running, created["id"])
    before = await account(running, created["id"])
    r = await running.client.get(
        "/oauth/callback",
        params={
            "error": "access_denied",
            "state": started["state"],
            "error_description": "AADSTS65004: User declined to consent <script>alert(1)</script>",
        },
    )
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("text/html")
    assert "authorization_denied" in r.text
    assert "User declined to consent" in r.text
    assert "<script>" not in r.text
    assert "&lt;script&gt;" in r.text
    assert f"POST /accounts/{created['id']}/authorize" in r.text
    after = await account(running, created["id"])
    assert after == before
    assert "authorization_failed" in await kinds(running, created["id"])
    replay = await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    assert replay.status_code == 400  # the state went with the denial
    assert not azure.calls


async def test_pkce_mismatch_leaves_the_account_unchanged(running: Any, azure: respx.MockRouter) -> None:
    """Azure's invalid_grant (AADSTS501481) is a 409 page; the account still needs authorization."""
    created = await create(running)
    started = await authorize(running, created["id"])
    azure.post(TOKEN_URL_V1).respond(400, json=AADSTS501481)
    r = await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    assert r.status_code == 409
    assert "needs_authorization" in r.text
    assert "AADSTS501481" in r.text
    assert CODE not in r.text
    j = await running.client.post(
        f"/accounts/{created['id']}/authorization-code", json={"code": CODE}, headers=admin()
    )
    assert (j.status_code, j.json()["code"]) == (409, "needs_authorization")
    got = await account(running, created["id"])
    assert (got["status"], got["has_refresh_token"]) == ("needs_authorization", False)
    events = await running.client.get(f"/accounts/{created['id']}/events", headers=admin())
    failed = [e for e in events.json()["items"] if e["kind"] == "authorization_failed"]
    assert failed[0]["detail"]["code"] == "needs_authorization"
    assert failed[0]["detail"]["idp_code"] == "invalid_grant"


async def test_state_is_single_use_under_concurrency(running: Any, azure: respx.MockRouter) -> None:
    """Two callbacks racing with one state: one succeeds, the other is invalid_state, one exchange."""
    created = await create(running)
    started = await authorize(running, created["id"])
    route = token_route(azure)
    answers = await asyncio.gather(
        *(
            running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
            for _ in range(2)
        )
    )
    assert sorted(a.status_code for a in answers) == [200, 400]
    assert route.call_count == 1


# -- the manual flow ----------------------------------------------------------------------------


async def test_pasted_redirect_url_uses_the_pending_authorization(
    running: Any, azure: respx.MockRouter
) -> None:
    """Pasting http://localhost/?code=…&state=… redeems with http://localhost and the PKCE verifier."""
    created = await create(running)
    started = await authorize(running, created["id"], redirect_uri="http://localhost")
    challenge = query(started["authorization_url"])["code_challenge"]
    route = token_route(azure)
    pasted = f"http://localhost/?code=abc&state={started['state']}&session_state=x"
    r = await running.client.post(
        f"/accounts/{created['id']}/authorization-code", json={"code": pasted}, headers=admin()
    )
    assert r.status_code == 200, r.text
    assert (r.json()["id"], r.json()["status"], r.json()["has_refresh_token"]) == (
        created["id"],
        "ready",
        True,
    )
    sent = form(route.calls.last.request)
    assert (sent["code"], sent["redirect_uri"]) == ("abc", "http://localhost")
    assert s256(sent["code_verifier"]) == challenge
    again = await running.client.post(
        f"/accounts/{created['id']}/authorization-code", json={"code": pasted}, headers=admin()
    )
    assert (again.status_code, again.json()["code"]) == (400, "invalid_state")


async def test_pasted_bare_code_uses_the_default_redirect(running: Any, azure: respx.MockRouter) -> None:
    """A bare code is redeemed without PKCE, with the body's redirect_uri or the default callback."""
    created = await create(running)
    route = token_route(azure)
    r = await running.client.post(
        f"/accounts/{created['id']}/authorization-code", json={"code": CODE}, headers=admin()
    )
    assert r.status_code == 200, r.text
    sent = form(route.calls.last.request)
    assert (sent["code"], sent["redirect_uri"]) == (CODE, DEFAULT_REDIRECT)
    assert "code_verifier" not in sent
    r = await running.client.post(
        f"/accounts/{created['id']}/authorization-code",
        json={"code": CODE, "redirect_uri": "http://localhost"},
        headers=admin(),
    )
    assert r.status_code == 200, r.text
    assert form(route.calls.last.request)["redirect_uri"] == "http://localhost"


async def test_paste_refusals(running: Any, azure: respx.MockRouter) -> None:
    """Another account's state is invalid_state, a pasted error is authorization_denied, no code is 422."""
    one, other = await create(running), await create(running)
    started = await authorize(running, other["id"], redirect_uri="http://localhost")
    url = f"/accounts/{one['id']}/authorization-code"
    r = await running.client.post(
        url, json={"code": f"http://localhost/?code=abc&state={started['state']}"}, headers=admin()
    )
    assert (r.status_code, r.json()["code"]) == (400, "invalid_state")
    r = await running.client.post(
        url,
        json={"code": "http://localhost/?error=access_denied&error_description=declined"},
        headers=admin(),
    )
    assert (r.status_code, r.json()["code"]) == (400, "authorization_denied")
    assert "declined" in r.json()["detail"]
    r = await running.client.post(url, json={"code": "http://localhost/?session_state=x"}, headers=admin())
    assert (r.status_code, r.json()["code"]) == (422, "validation_error")
    r = await running.client.post("/accounts/nope/authorization-code", json={"code": CODE}, headers=admin())
    assert r.status_code == 404
    assert not azure.calls
    assert (await account(running, one["id"]))["status"] == "needs_authorization"


# -- test connection ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason", "step"),
    [
        (httpx.Response(401), "unauthorized", "api_url"),
        (httpx.Response(403), "forbidden", "security role"),
        (httpx.ConnectError("refused"), "unreachable", "firewall"),
    ],
)
async def test_whoami_problems_are_explained(
    answer: httpx.Response | Exception, reason: str, step: str, running: Any, azure: respx.MockRouter
) -> None:
    """WhoAmI's 401, 403 and network errors are ok=false with the reason and what to do."""
    created = await create(running, refresh_token="0.AQ8A-stored-refresh-token")
    token_route(azure)
    azure.get(WHOAMI).mock(side_effect=[answer])
    r = await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["ok"], body["reason"]) == (False, reason)
    assert step in body["next_step"]
    assert body["message"]
    assert ACCESS not in r.text


@pytest.mark.parametrize(
    ("answer", "reason", "step"),
    [
        (
            httpx.Response(400, json={"error": "invalid_grant", "error_codes": [70008]}),
            "needs_authorization",
            "/authorize",
        ),
        (
            httpx.Response(401, json={"error": "invalid_client", "error_codes": [7000215]}),
            "invalid_credentials",
            "client_secret",
        ),
        (httpx.ConnectError("refused"), "upstream_unavailable", "try later"),
    ],
)
async def test_token_problems_are_explained(
    answer: httpx.Response | Exception, reason: str, step: str, running: Any, azure: respx.MockRouter
) -> None:
    """No token from Azure AD is ok=false with needs_authorization, invalid_credentials or upstream."""
    created = await create(running, refresh_token="0.AQ8A-stored-refresh-token")
    azure.post(TOKEN_URL_V1).mock(side_effect=[answer])
    r = await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    assert r.status_code == 200, r.text
    assert (r.json()["ok"], r.json()["reason"]) == (False, reason)
    assert step in r.json()["next_step"]


async def test_without_refresh_token_needs_authorization_and_no_idp_call(
    running: Any, azure: respx.MockRouter
) -> None:
    """An account never authorized tests as needs_authorization without calling Azure AD."""
    created = await create(running)
    r = await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    assert r.status_code == 200
    assert r.json() == {
        "ok": False,
        "user_id": None,
        "organization_id": None,
        "business_unit_id": None,
        "latency_ms": None,
        "reason": "needs_authorization",
        "message": r.json()["message"],
        "next_step": f"authorize the account (POST /accounts/{created['id']}/authorize)",
    }
    assert not azure.calls
    missing = await running.client.post("/accounts/nope/test", headers=admin())
    assert (missing.status_code, missing.json()["code"]) == (404, "account_not_found")


# -- secrets and history ----------------------------------------------------------------------------


async def test_no_secret_in_any_response_or_log(
    running: Any, azure: respx.MockRouter, caplog: pytest.LogCaptureFixture
) -> None:
    """Secret, refresh token, code and verifier never appear; the access token only in /token."""
    caplog.set_level(logging.DEBUG)
    seen = Seen()
    running.client.event_hooks["response"].append(seen)
    created = await create(running, name="contoso-<b>&co")
    started = await authorize(running, created["id"])
    route = token_route(azure)
    page = await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    assert "contoso-&lt;b&gt;&amp;co" in page.text
    verifier = form(route.calls.last.request)["code_verifier"]
    await running.client.get(f"/accounts/{created['id']}", headers=admin())
    await running.client.get(f"/accounts/{created['id']}/token", headers=admin())
    azure.get(WHOAMI).respond(200, json=IDS)
    await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    await running.client.get(f"/accounts/{created['id']}/events", headers=admin())
    await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    await running.client.get(
        "/oauth/callback", params={"code": CODE, "state": started["state"]}, headers=JSON
    )
    assert len(seen.responses) == 9
    for secret in (CLIENT_SECRET, REFRESH, CODE, verifier):
        assert seen.containing(secret) == [], secret
    assert seen.containing(ACCESS) == [f"/accounts/{created['id']}/token"]
    # The test's own client logs the URLs it requests; everything else is the broker's.
    logged = "\n".join(
        f"{r.getMessage()} {r.__dict__}" for r in caplog.records if "http://broker.test" not in r.getMessage()
    )
    assert any(r.name == "service.access" and r.__dict__["path"] == "/oauth/callback" for r in caplog.records)
    for secret in (CLIENT_SECRET, REFRESH, CODE, verifier, ACCESS, started["state"]):
        assert secret not in logged


async def test_events_newest_first(running: Any, azure: respx.MockRouter) -> None:
    """The history lists authorization_started, authorized and connection_tested, newest first."""
    created = await create(running)
    started = await authorize(running, created["id"])
    token_route(azure)
    await running.client.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
    azure.get(WHOAMI).respond(200, json=IDS)
    await running.client.post(f"/accounts/{created['id']}/test", headers=admin())
    r = await running.client.get(f"/accounts/{created['id']}/events", headers=admin())
    items = r.json()["items"]
    order = [
        e["kind"] for e in items if e["kind"] in ("authorization_started", "authorized", "connection_tested")
    ]
    assert order == ["connection_tested", "authorized", "authorization_started"]
    by_kind = {e["kind"]: e for e in items}
    assert by_kind["connection_tested"]["detail"] == {"ok": True}
    assert by_kind["authorization_started"]["actor"].startswith("k_")
    assert by_kind["connection_tested"]["actor"] == by_kind["authorization_started"]["actor"]


async def test_openapi_documents_the_endpoints(running: Any) -> None:
    """The four endpoints are in the OpenAPI document; the callback needs no API key and speaks HTML."""
    doc = (await running.client.get("/openapi.json")).json()
    paths = doc["paths"]
    for path in (
        "/accounts/{account_id}/authorize",
        "/accounts/{account_id}/authorization-code",
        "/accounts/{account_id}/test",
    ):
        assert "security" in paths[path]["post"]
    callback = paths["/oauth/callback"]["get"]
    assert "security" not in callback
    assert "text/html" in callback["responses"]["200"]["content"]
    assert "registered" in paths["/accounts/{account_id}/authorize"]["post"]["description"]


# -- pure helpers -------------------------------------------------------------------------------------


def test_s256_matches_rfc_7636() -> None:
    """The challenge is base64url(sha256(verifier)) without padding (RFC 7636 appendix B)."""
    assert (
        s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )
    digest = hashlib.sha256(b"x").digest()
    assert s256("x") == base64.urlsafe_b64encode(digest).decode().rstrip("=")


@pytest.mark.parametrize(
    ("pasted", "code", "state", "error"),
    [
        ("abc", "abc", None, None),
        ("  0.AQ8A-x_y.z  ", "0.AQ8A-x_y.z", None, None),
        ("http://localhost/?code=a%2Bb&state=s&session_state=x", "a+b", "s", None),
        ("http://localhost/#code=abc&state=s", "abc", "s", None),
        ("?code=abc&state=s", "abc", "s", None),
        ("http://localhost/?error=access_denied&state=s", None, "s", "access_denied"),
    ],
)
def test_parse_pasted(pasted: str, code: str | None, state: str | None, error: str | None) -> None:
    """A bare code, a pasted redirect URL (query or fragment) or a bare query string all work."""
    got = parse_pasted(pasted)
    assert (got.code, got.state, got.error) == (code, state, error)


def test_parse_pasted_url_without_code() -> None:
    """A pasted URL without a code is refused rather than sent to Azure as the code."""
    with pytest.raises(InvalidInput):
        parse_pasted("http://localhost/?session_state=x")


@pytest.mark.parametrize(
    "pasted",
    ["http://[abc/?code=x", "http://localhost/?code=x&" + "&".join(["p=v"] * 60), "code=x" + "&p=v" * 60],
)
def test_parse_pasted_refuses_what_the_url_parser_cannot_read(pasted: str) -> None:
    """urlsplit's and parse_qs's ValueErrors become a 422 on `code`, never a foreign error."""
    with pytest.raises(InvalidInput) as info:
        parse_pasted(pasted)
    assert [e["loc"] for e in info.value.errors] == [["body", "code"]]
    assert "code=x" not in info.value.detail


@pytest.mark.parametrize(
    ("uri", "ok"),
    [
        ("http://localhost", True),
        ("https://broker.example.net/oauth/callback?x=1", True),
        ("https://x.example/#", False),
        ("mailto:a@b", False),
        ("https://[::1", False),
    ],
)
def test_redirect_uri_rules(uri: str, ok: bool) -> None:
    """Absolute http(s), no fragment, parseable."""
    assert (redirect_uri_problem(uri) is None) is ok


@pytest.mark.parametrize(
    ("accept", "json"),
    [
        (None, False),
        ("*/*", False),
        ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", False),
        ("application/json", True),
        ("application/problem+json", True),
        ("application/json, text/html;q=0.5", True),
        ("text/html, application/json;q=0.9", False),
        ("application/json;q=bad, text/html;q=0.1", False),
    ],
)
def test_accept_negotiation(accept: str | None, json: bool) -> None:
    """JSON only when Accept ranks it above HTML; a browser's default gets the page."""
    assert _prefers_json(accept) is json
