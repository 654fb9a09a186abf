"""The accounts API as the contract says, on SQLite and MariaDB; bad input changes nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.kit import sealing
from service.models import Account
from tests.conftest import CLIENT_SECRET, REFRESH_TOKEN, account_body, admin, client

SECRETS = (CLIENT_SECRET, REFRESH_TOKEN)


async def snapshot(running: Any) -> list[dict[str, Any]]:
    r = await running.client.get("/accounts?limit=500", headers=admin())
    items: list[dict[str, Any]] = r.json()["items"]
    return items


async def create(running: Any, **overrides: Any) -> dict[str, Any]:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_create_returns_location_etag_and_no_secrets(running: Any) -> None:
    """201 with Location and ETag; secrets are write-only and stored encrypted."""
    r = await running.client.post("/accounts", json=account_body(name="Contoso"), headers=admin())
    assert r.status_code == 201
    body = r.json()
    assert r.headers["location"] == f"/accounts/{body['id']}"
    assert r.headers["etag"] == f'"{body["version"]}"'
    assert body["has_client_secret"] is True
    assert body["has_refresh_token"] is True
    assert body["grant_type"] == "authorization_code"
    assert body["status"] == "ready"
    assert "client_secret" not in body
    assert "refresh_token" not in body
    for secret in SECRETS:
        assert secret not in r.text
    async with running.ctx.sessions() as session:
        row = await session.get(Account, body["id"])
    assert row is not None
    assert row.client_secret is not None
    assert row.client_secret.startswith("v1.")
    assert CLIENT_SECRET not in row.client_secret
    assert REFRESH_TOKEN not in row.refresh_token
    keyring = running.ctx.keyring
    assert sealing.unseal(keyring, sealing.CLIENT_SECRET, body["id"], row.client_secret) == CLIENT_SECRET


async def test_account_without_refresh_token_needs_authorization(running: Any) -> None:
    """REFRESH_TOKEN is the empty string before authorization, and status says so."""
    body = await create(running, refresh_token=None)
    assert body["status"] == "needs_authorization"
    assert body["has_refresh_token"] is False
    async with running.ctx.sessions() as session:
        row = await session.get(Account, body["id"])
    assert row is not None
    assert row.refresh_token == ""


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"token_url": "http://login.microsoftonline.com/t/oauth2/token"}, "token_url"),
        ({"api_url": "https://evil.example.com/api/data/v9.2"}, "api_url"),
        ({"authorization_url": "https://169.254.169.254/latest/meta-data"}, "authorization_url"),
        ({"token_url": "https://user:pw@login.microsoftonline.com/t/oauth2/token"}, "token_url"),
        ({"api_url": "https://10.0.0.1/api"}, "api_url"),
        ({"api_url": "not a url"}, "api_url"),
    ],
)
async def test_urls_are_validated_with_the_field_named(
    running: Any, change: dict[str, str], field: str
) -> None:
    """A URL that is not https on an allowed host is 422 naming the field and why."""
    before = await snapshot(running)
    r = await running.client.post("/accounts", json=account_body(**change), headers=admin())
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "validation_error"
    assert field in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", field]
    assert await snapshot(running) == before


@pytest.mark.parametrize(
    "body",
    [
        {**account_body(), "unexpected": 1},
        {**account_body(), "name": ""},
        {**account_body(), "name": "x" * 256},
        {**account_body(), "client_secret": "s" * 129},
        {**account_body(), "client_secret": "sécret"},
        {**account_body(), "grant_type": "password"},
        {**account_body(), "default_account": "maybe"},
        {k: v for k, v in account_body().items() if k != "tenant_id"},
    ],
)
async def test_bad_bodies_are_422_and_echo_no_secret(running: Any, body: dict[str, Any]) -> None:
    """Unknown fields, limits and types are refused with problem+json; nothing is stored."""
    r = await running.client.post("/accounts", json=body, headers=admin())
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "validation_error"
    assert CLIENT_SECRET not in r.text
    assert "s" * 129 not in r.text
    assert await snapshot(running) == []


async def test_malformed_json_and_wrong_content_type(running: Any) -> None:
    """Broken JSON and non-JSON bodies are 422 problem documents."""
    for content, ctype in (
        (b"{not json", "application/json"),
        (b"name=x", "application/x-www-form-urlencoded"),
    ):
        r = await running.client.post(
            "/accounts", content=content, headers={**admin(), "content-type": ctype}
        )
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
    assert await snapshot(running) == []


async def test_oversized_body_is_refused_early(running: Any) -> None:
    """A body over the limit is 413 before it is parsed."""
    big = b'{"name": "' + b"x" * 100_000 + b'"}'
    r = await running.client.post(
        "/accounts", content=big, headers={**admin(), "content-type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["code"] == "payload_too_large"


async def test_name_conflict(running: Any) -> None:
    """A second account with the same name is 409 name_conflict, on create and on rename."""
    await create(running, name="same")
    other = await create(running, name="other")
    r = await running.client.post("/accounts", json=account_body(name="same"), headers=admin())
    assert r.status_code == 409
    assert r.json()["code"] == "name_conflict"
    r = await running.client.patch(f"/accounts/{other['id']}", json={"name": "same"}, headers=admin())
    assert r.status_code == 409
    assert r.json()["code"] == "name_conflict"
    assert {a["name"] for a in await snapshot(running)} == {"same", "other"}


async def test_etag_and_if_match(running: Any) -> None:
    """PATCH with a stale If-Match is 412 and changes nothing; a current one succeeds."""
    created = await create(running, name="v")
    url = f"/accounts/{created['id']}"
    got = await running.client.get(url, headers=admin())
    etag = got.headers["etag"]
    ok = await running.client.patch(url, json={"name": "v2"}, headers={**admin(), "If-Match": etag})
    assert ok.status_code == 200
    assert ok.json()["version"] == created["version"] + 1
    assert ok.headers["etag"] == f'"{created["version"] + 1}"'
    stale = await running.client.patch(url, json={"name": "v3"}, headers={**admin(), "If-Match": etag})
    assert stale.status_code == 412
    assert stale.json()["code"] == "version_conflict"
    assert (await running.client.get(url, headers=admin())).json()["name"] == "v2"
    bad = await running.client.patch(url, json={"name": "v4"}, headers={**admin(), "If-Match": "garbage"})
    assert bad.status_code == 422


async def test_patch_secrets_and_nulls(running: Any) -> None:
    """Secrets can be replaced or cleared; required fields cannot be null."""
    created = await create(running)
    url = f"/accounts/{created['id']}"
    r = await running.client.patch(url, json={"client_secret": None, "refresh_token": None}, headers=admin())
    assert r.status_code == 200
    assert r.json()["has_client_secret"] is False
    assert r.json()["has_refresh_token"] is False
    assert r.json()["status"] == "needs_authorization"
    r = await running.client.patch(url, json={"name": None}, headers=admin())
    assert r.status_code == 422
    r = await running.client.patch(url, json={"api_url": "https://evil.example.org/"}, headers=admin())
    assert r.status_code == 422
    assert (await running.client.get(url, headers=admin())).json()["api_url"] == created["api_url"]


async def test_single_default_account(running: Any) -> None:
    """Making one account the default clears the other in the same transaction."""
    a = await create(running, default_account=True)
    b = await create(running, default_account=True)
    items = {i["id"]: i["default_account"] for i in await snapshot(running)}
    assert items == {a["id"]: False, b["id"]: True}
    await running.client.patch(f"/accounts/{a['id']}", json={"default_account": True}, headers=admin())
    items = {i["id"]: i["default_account"] for i in await snapshot(running)}
    assert items == {a["id"]: True, b["id"]: False}


async def test_concurrent_default_changes_leave_one_default(running: Any) -> None:
    """Many concurrent 'make me the default' requests leave exactly one default."""
    accounts = [await create(running) for _ in range(8)]
    results = await asyncio.gather(
        *(
            running.client.patch(f"/accounts/{a['id']}", json={"default_account": True}, headers=admin())
            for a in accounts
            for _ in range(3)
        )
    )
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    defaults = [i for i in await snapshot(running) if i["default_account"]]
    assert len(defaults) == 1


async def test_list_pagination(running: Any) -> None:
    """limit and offset page through accounts; limit is bounded."""
    for n in range(5):
        await create(running, name=f"acct-{n}")
    page = (await running.client.get("/accounts?limit=2&offset=1", headers=admin())).json()
    assert [i["name"] for i in page["items"]] == ["acct-1", "acct-2"]
    assert (await running.client.get("/accounts?limit=501", headers=admin())).status_code == 422
    assert (await running.client.get("/accounts?offset=-1", headers=admin())).status_code == 422


async def test_delete(running: Any) -> None:
    """DELETE is 204, then the account is 404 everywhere."""
    created = await create(running)
    url = f"/accounts/{created['id']}"
    assert (await running.client.delete(url, headers=admin())).status_code == 204
    for method in ("GET", "DELETE"):
        r = await running.client.request(method, url, headers=admin())
        assert r.status_code == 404
        assert r.json()["code"] == "account_not_found"
    r = await running.client.patch(url, json={"name": "x"}, headers=admin())
    assert r.status_code == 404


async def test_auth_401_and_403(running: Any) -> None:
    """No or wrong key is 401 with WWW-Authenticate; a client key may not manage accounts (403)."""
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Token x"}):
        r = await running.client.get("/accounts", headers=headers)
        assert r.status_code == 401
        assert "Bearer" in r.headers["www-authenticate"]
        assert r.headers["content-type"] == "application/problem+json"
    r = await running.client.post("/accounts", json=account_body(), headers=client())
    assert r.status_code == 403
    assert r.json()["code"] == "forbidden"
    assert await snapshot(running) == []


async def test_unknown_path_and_method_are_problems(running: Any) -> None:
    """Framework errors are problem+json too."""
    r = await running.client.get("/nope", headers=admin())
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/problem+json"
    r = await running.client.put("/accounts", headers=admin())
    assert r.status_code == 405
    assert r.json()["code"] == "method_not_allowed"


async def test_health_endpoints(running: Any) -> None:
    """healthz and readyz answer without a key; metrics are Prometheus text."""
    assert (await running.client.get("/healthz")).json() == {"status": "ok"}
    ready = await running.client.get("/readyz")
    assert ready.status_code == 200
    metrics = await running.client.get("/metrics")
    assert "broker_token_requests_total" in metrics.text


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("token_url", "https://evil.com\\.crm.dynamics.com/t"),
        ("api_url", "https://evil.com%2f.crm.dynamics.com/t"),
        ("authorization_url", "https://evil.com%5c.crm.dynamics.com/t"),
        ("token_url", "https://login.microsoftonline.com:22/"),
        ("api_url", "https://contoso.crm.dynamics.com:8443/api/data/v9.2"),
    ],
)
async def test_non_host_names_and_other_ports_are_not_stored(field: str, url: str, running: Any) -> None:
    """A URL whose host is no RFC 1123 name, or whose port is not 443, is 422 and nothing is stored."""
    r = await running.client.post("/accounts", json=account_body(**{field: url}), headers=admin())
    assert (r.status_code, r.json()["code"]) == (422, "validation_error"), r.text
    assert r.json()["errors"][0]["loc"] == ["body", field]
    listed = await running.client.get("/accounts", headers=admin())
    assert listed.json()["items"] == []
