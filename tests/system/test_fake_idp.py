"""Tests of the fake Azure AD / Dynamics server in tests/fake_idp.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.fake_idp import FakeIdpState, build_app, running_fake_idp

TENANT = "contoso.onmicrosoft.com"
V1 = f"/{TENANT}/oauth2/token"
V2 = f"/{TENANT}/oauth2/v2.0/token"
ORG = "https://contoso.crm4.dynamics.com"
REDIRECT = "https://broker.example/callback"
AZURE_ERROR_KEYS = {"error", "error_description", "error_codes", "timestamp", "trace_id", "correlation_id"}


@pytest.fixture
def state() -> FakeIdpState:
    fake = FakeIdpState()
    fake.add_client("app-1", "secret-1", TENANT, [REDIRECT])
    fake.add_client("app-2", "secret-2", TENANT)
    return fake


@pytest.fixture
async def idp(state: FakeIdpState) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_app(state))
    async with httpx.AsyncClient(transport=transport, base_url="http://idp.test") as client:
        yield client


def refresh_form(
    token: str, client_id: str = "app-1", secret: str = "secret-1", **extra: str
) -> dict[str, str]:
    form = {"grant_type": "refresh_token", "refresh_token": token, "client_id": client_id}
    return form | {"client_secret": secret} | extra


def assert_azure_error(response: httpx.Response, status: int, error: str, code: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert AZURE_ERROR_KEYS | {"error_uri"} == set(body)
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert (
        f"\r\nTrace ID: {body['trace_id']}\r\nCorrelation ID: {body['correlation_id']}\r\n"
        in (body["error_description"])
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", body["timestamp"])
    return body


async def test_v1_refresh_answers_string_lifetimes_and_rotates(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """A v1 refresh answers string lifetimes, echoes resource and hands out a new refresh token."""
    old = state.add_refresh_token("app-1", "rt-old")
    response = await idp.post(V1, data=refresh_form(old, resource=ORG))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "user_impersonation"
    assert body["resource"] == ORG
    assert body["expires_in"] == "3599"
    assert body["ext_expires_in"] == "3599"
    assert isinstance(body["expires_on"], str)
    assert isinstance(body["not_before"], str)
    assert int(body["expires_on"]) - int(body["not_before"]) == 3599
    assert body["refresh_token"] != old
    assert body["access_token"].count(".") == 2


async def test_v2_refresh_answers_numeric_lifetimes_and_echoes_scope(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """A v2 refresh answers numeric expires_in/ext_expires_in and echoes the scope."""
    state.configure({"token_ttl": 120})
    scope = f"{ORG}/user_impersonation offline_access"
    response = await idp.post(V2, data=refresh_form(state.add_refresh_token("app-1"), scope=scope))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["expires_in"] == 120
    assert body["ext_expires_in"] == 120
    assert body["scope"] == scope
    assert "resource" not in body
    assert "expires_on" not in body
    assert body["refresh_token"]


async def test_strict_mode_rejects_reused_refresh_token(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """In strict mode a rotated-away refresh token answers invalid_grant and counts a reuse."""
    old = state.add_refresh_token("app-1")
    first = await idp.post(V1, data=refresh_form(old, resource=ORG))
    assert first.status_code == 200
    again = await idp.post(V1, data=refresh_form(old, resource=ORG))
    assert_azure_error(again, 400, "invalid_grant", 70008)
    newer = await idp.post(V1, data=refresh_form(first.json()["refresh_token"], resource=ORG))
    assert newer.status_code == 200
    stats = state.stats()
    assert stats["reuse"] == 1
    assert stats["valid_refresh_tokens"] == {"app-1": [newer.json()["refresh_token"]]}


async def test_azure_mode_keeps_old_refresh_token_valid(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """In azure mode the old refresh token still works after rotation."""
    await idp.post("/_control/mode", json={"refresh_token_mode": "azure"})
    old = state.add_refresh_token("app-1")
    first = await idp.post(V2, data=refresh_form(old, scope=f"{ORG}/.default"))
    second = await idp.post(V2, data=refresh_form(old, scope=f"{ORG}/.default"))
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.json()["refresh_token"] != second.json()["refresh_token"]
    assert state.stats()["reuse"] == 0


async def test_unknown_refresh_token_is_invalid_grant(idp: httpx.AsyncClient) -> None:
    """A refresh token the fake never issued answers 400 invalid_grant AADSTS70008."""
    body = assert_azure_error(
        await idp.post(V1, data=refresh_form("never-issued")), 400, "invalid_grant", 70008
    )
    assert "expired due to inactivity" in str(body["error_description"])


async def test_client_credentials_returns_access_token_only(idp: httpx.AsyncClient) -> None:
    """client_credentials answers an access token without refresh token, and v2 needs a /.default scope."""
    form = {"grant_type": "client_credentials", "client_id": "app-2", "client_secret": "secret-2"}
    v1 = await idp.post(V1, data=form | {"resource": ORG})
    assert v1.status_code == 200, v1.text
    assert "refresh_token" not in v1.json()
    assert v1.json()["resource"] == ORG
    v2 = await idp.post(V2, data=form | {"scope": f"{ORG}/.default"})
    assert v2.status_code == 200
    assert "refresh_token" not in v2.json()
    assert v2.json()["expires_in"] == 3599
    assert_azure_error(await idp.post(V2, data=form | {"scope": ORG}), 400, "invalid_scope", 1002012)


async def test_wrong_secret_answers_azure_invalid_client(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """A wrong client secret answers 401 invalid_client AADSTS7000215 in Azure's body shape."""
    token = state.add_refresh_token("app-1")
    response = await idp.post(
        V1, data=refresh_form(token, secret="wrong"), headers={"client-request-id": "corr-1"}
    )
    body = assert_azure_error(response, 401, "invalid_client", 7000215)
    assert body["correlation_id"] == "corr-1"
    assert "Invalid client secret provided" in str(body["error_description"])
    assert state.stats()["valid_refresh_tokens"] == {"app-1": [token]}  # not consumed


async def test_invalid_client_mode_fails_every_token_call(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """Mode invalid_client answers invalid_client even with the right secret."""
    state.configure({"mode": "invalid_client"})
    response = await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))
    assert_azure_error(response, 401, "invalid_client", 7000215)


async def test_throttle_answers_429_with_retry_after(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """Mode throttle answers 429 with the configured Retry-After and an Azure error body."""
    answer = await idp.post("/_control/mode", json={"mode": "throttle", "retry_after": 7})
    assert answer.json()["mode"] == "throttle"
    response = await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))
    assert_azure_error(response, 429, "temporarily_unavailable", 90055)
    assert response.headers["Retry-After"] == "7"
    assert state.stats()["faults"] == {"throttle": 1}


async def test_down_and_garbage_modes(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """Mode down answers 503 with Retry-After; mode garbage answers 200 with an HTML body."""
    state.configure({"mode": "down"})
    down = await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))
    assert_azure_error(down, 503, "temporarily_unavailable", 90033)
    assert down.headers["Retry-After"] == "1"
    state.configure({"mode": "garbage"})
    garbage = await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))
    assert garbage.status_code == 200
    assert garbage.headers["content-type"].startswith("text/html")


async def test_bad_control_request_is_rejected(idp: httpx.AsyncClient) -> None:
    """The control API answers 400 to an unknown mode and 404 to an unknown action."""
    assert (await idp.post("/_control/mode", json={"mode": "sideways"})).status_code == 400
    assert (await idp.post("/_control/nope", json={})).status_code == 404


def pkce_pair() -> tuple[str, str]:
    verifier = "v" * 50
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(
        b"="
    ).decode()


async def authorize(idp: httpx.AsyncClient, challenge: str, **extra: str) -> dict[str, list[str]]:
    params = {"client_id": "app-1", "response_type": "code", "redirect_uri": REDIRECT, "state": "s t&x=1"}
    params |= {"code_challenge": challenge, "code_challenge_method": "S256", "resource": ORG} | extra
    response = await idp.get(f"/{TENANT}/oauth2/authorize", params=params)
    assert response.status_code == 302, response.text
    location = urlsplit(response.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    return parse_qs(location.query)


async def test_authorize_code_redeems_with_matching_pkce(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """authorize redirects with code, verbatim state and session_state; the code redeems once with PKCE."""
    verifier, challenge = pkce_pair()
    query = await authorize(idp, challenge)
    assert query["state"] == ["s t&x=1"]
    assert query["session_state"]
    form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT}
    form |= {"client_id": "app-1", "client_secret": "secret-1", "code_verifier": verifier}
    response = await idp.post(V1, data=form)
    assert response.status_code == 200, response.text
    assert {"access_token", "refresh_token", "id_token"} <= set(response.json())
    assert response.json()["resource"] == ORG
    assert_azure_error(await idp.post(V1, data=form), 400, "invalid_grant", 54005)
    assert state.stats()["secret_in_authorize_url"] == 0


async def test_authorize_code_rejects_wrong_pkce_verifier(idp: httpx.AsyncClient) -> None:
    """A code_verifier that does not match the S256 challenge answers invalid_grant AADSTS501481."""
    _, challenge = pkce_pair()
    query = await authorize(idp, challenge)
    form = {"grant_type": "authorization_code", "code": query["code"][0], "redirect_uri": REDIRECT}
    form |= {"client_id": "app-1", "client_secret": "secret-1", "code_verifier": "w" * 50}
    body = assert_azure_error(await idp.post(V1, data=form), 400, "invalid_grant", 501481)
    assert "The Code_Verifier does not match the code_challenge" in str(body["error_description"])


async def test_authorize_counts_secret_in_url_and_denies(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """A client_secret in the authorize URL is counted; mode deny_authorize redirects with access_denied."""
    await authorize(idp, pkce_pair()[1], client_secret="leak")
    assert state.stats()["secret_in_authorize_url"] == 1
    state.configure({"mode": "deny_authorize"})
    query = await authorize(idp, pkce_pair()[1])
    assert query["error"] == ["access_denied"]
    assert query["state"] == ["s t&x=1"]
    assert "code" not in query


async def test_whoami_accepts_issued_token_and_rejects_unknown(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """WhoAmI answers 200 for a token the fake issued, 401 for an unknown one, 403 in whoami_forbidden."""
    token = (await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))).json()["access_token"]
    url = "https://contoso.crm4.dynamics.com/api/data/v9.2/WhoAmI"
    good = await idp.get(url, headers={"Authorization": f"Bearer {token}"})
    assert good.status_code == 200
    assert {"@odata.context", "BusinessUnitId", "UserId", "OrganizationId"} == set(good.json())
    unknown = await idp.get(url, headers={"Authorization": "Bearer nope"})
    assert unknown.status_code == 401
    assert "WWW-Authenticate" in unknown.headers
    state.configure({"mode": "whoami_forbidden"})
    forbidden = await idp.get(url, headers={"Authorization": f"Bearer {token}"})
    assert forbidden.status_code == 403
    assert forbidden.json()["error"]["code"] == "0x80072560"


async def test_expired_access_token_is_rejected_by_whoami(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """An access token past its token_ttl is refused by WhoAmI."""
    state.configure({"token_ttl": 0})
    token = (await idp.post(V1, data=refresh_form(state.add_refresh_token("app-1")))).json()["access_token"]
    response = await idp.get("/api/data/v9.2/WhoAmI", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401


async def test_stats_count_calls_and_reset(idp: httpx.AsyncClient, state: FakeIdpState) -> None:
    """Stats count token calls by grant, client and error; reset clears counters but keeps tokens."""
    token = state.add_refresh_token("app-1")
    await idp.post(V1, data=refresh_form(token))
    await idp.post(V1, data=refresh_form(token))
    await idp.post(V1, data=refresh_form("x", client_id="app-2", secret="secret-2"))
    cc = {"grant_type": "client_credentials", "client_id": "app-2", "client_secret": "secret-2"}
    await idp.post(V1, data=cc)
    stats = (await idp.get("/_control/stats")).json()
    assert stats["token_calls"] == 4
    assert stats["by_grant"] == {"refresh_token": 3, "client_credentials": 1}
    assert stats["by_client"] == {"app-1": 2, "app-2": 2}
    assert stats["refresh_by_client"] == {"app-1": 2, "app-2": 1}
    assert stats["errors"] == {"invalid_grant": 2}
    assert stats["reuse"] == 1
    assert stats["max_in_flight"] == 1
    assert (stats["in_flight"], stats["held"]) == (0, 0)
    reset = (await idp.post("/_control/reset")).json()
    assert (reset["token_calls"], reset["by_grant"], reset["reuse"], reset["max_in_flight"]) == (0, {}, 0, 0)
    assert len(reset["valid_refresh_tokens"]["app-1"]) == 1


async def test_hold_keeps_token_calls_in_flight_until_release(
    idp: httpx.AsyncClient, state: FakeIdpState
) -> None:
    """Mode hold parks token calls until /_control/release, so concurrent refreshes meet at the fake."""
    token = state.add_refresh_token("app-1")
    await idp.post("/_control/mode", json={"mode": "hold"})
    calls = [asyncio.create_task(idp.post(V1, data=refresh_form(token))) for _ in range(3)]
    for _ in range(500):
        if state.held == 3:
            break
        await asyncio.sleep(0.01)
    assert state.stats()["in_flight"] == 3
    assert (await idp.post("/_control/release")).json() == {"released": 3}
    statuses = sorted(response.status_code for response in await asyncio.gather(*calls))
    assert statuses == [200, 400, 400]
    stats = state.stats()
    assert (stats["max_in_flight"], stats["max_in_flight_by_client"], stats["reuse"]) == (3, {"app-1": 3}, 2)


def test_subprocess_round_trip_and_exit() -> None:
    """running_fake_idp starts the CLI on a free port, serves a refresh round trip and stops the process."""
    seed = {"client_id": "app-1", "refresh_token": "rt-1"}
    client = {"client_id": "app-1", "client_secret": "secret-1", "tenant": TENANT}
    with running_fake_idp(clients=[client], refresh_tokens=[seed], token_ttl=600) as fake:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", fake.url)
        assert fake.port > 0
        with httpx.Client(base_url=fake.url) as http:
            response = http.post(V2, data=refresh_form("rt-1", scope=f"{ORG}/.default"))
            assert response.status_code == 200, response.text
            assert response.json()["expires_in"] == 600
            whoami = http.get(
                "/api/data/v9.2/WhoAmI",
                headers={"Authorization": f"Bearer {response.json()['access_token']}"},
            )
            assert whoami.status_code == 200
        assert fake.stats()["refresh_by_client"] == {"app-1": 1}
        assert fake.control("mode", {"mode": "normal"})["token_ttl"] == 600
        process = fake.process
    assert process.poll() is not None
