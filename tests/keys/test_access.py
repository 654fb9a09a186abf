"""Access: every operation in the OpenAPI document, tried with no key, a wrong key, a client key and a
scoped key, answers 401/403/404 exactly as DESIGN.md says, and never with account data.

The operations are read from the running app's ``/openapi.json``, so a new endpoint is covered the
day it is added. Path parameters are filled with a real account's or key's id. Azure AD is the
strict respx router: a client key fetching a token gets one, nothing else reaches the network.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import secrets
import statistics
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import respx

from service import migrate
from tests.conftest import (
    ADMIN_KEY,
    API_URL,
    CLIENT_KEY,
    CLIENT_SECRET,
    REFRESH_TOKEN,
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

PROBLEM = "application/problem+json"
ACCESS_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-token-for-access-tests"
# DESIGN.md: every endpoint except these needs a key. /docs and /openapi.json are not in the
# document's paths; they are checked on their own.
PUBLIC = frozenset({"/healthz", "/readyz", "/metrics", "/oauth/callback"})
TOKEN_PATH = "/accounts/{account_id}/token"
PROXY_PATH = "/accounts/{account_id}/api/{path}"  # client keys may call it (service/proxy/)
METHODS = ("get", "post", "put", "patch", "delete")
WHOAMI = {
    "UserId": "a1a2a3a4-0000-0000-0000-000000000002",
    "OrganizationId": "c1c2c3c4-0000-0000-0000-000000000003",
    "BusinessUnitId": "b1b2b3b4-0000-0000-0000-000000000001",
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_account(running: Running, **overrides: Any) -> dict[str, Any]:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def new_key(running: Running, **body: Any) -> dict[str, Any]:
    r = await running.client.post("/keys", json={"name": "t", **body}, headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def snapshot(running: Running) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    accounts = await running.client.get("/accounts?limit=500", headers=admin())
    keys = await running.client.get("/keys?limit=500", headers=admin())
    # last_used_at moves whenever a managed key is used (at most once a minute): not "data changed".
    key_items = [{k: v for k, v in item.items() if k != "last_used_at"} for item in keys.json()["items"]]
    return accounts.json()["items"], key_items


async def operations(running: Running) -> list[tuple[str, str]]:
    """(METHOD, path template) of every operation in the app's own OpenAPI document."""
    r = await running.client.get("/openapi.json")
    assert r.status_code == 200
    found = [
        (method.upper(), path)
        for path, item in r.json()["paths"].items()
        for method in item
        if method in METHODS
    ]
    assert len(found) >= 19, found  # the contract's endpoints, at least
    return found


def body_for(method: str, path: str) -> dict[str, Any] | None:
    """A valid body, so that nothing but the key decides the answer."""
    bodies: dict[tuple[str, str], Callable[[], dict[str, Any] | None]] = {
        ("POST", "/accounts"): account_body,
        ("PATCH", "/accounts/{account_id}"): lambda: {"name": f"renamed-{uuid.uuid4().hex[:6]}"},
        ("POST", "/accounts/{account_id}/authorize"): lambda: None,
        ("POST", "/accounts/{account_id}/authorization-code"): lambda: {"code": "0.AQ8A-code"},
        ("POST", "/keys"): lambda: {"name": "minted", "role": "admin", "accounts": None},
        ("PATCH", "/keys/{key_id}"): lambda: {"name": "renamed"},
    }
    make = bodies.get((method, path))
    if make is not None:
        return make()
    return {} if method in ("POST", "PATCH", "PUT") else None


def fill(path: str, account_id: str, key_id: str) -> str:
    return path.replace("{account_id}", account_id).replace("{key_id}", key_id).replace("{path}", "WhoAmI")


def assert_no_account_data(r: httpx.Response, *accounts: dict[str, Any]) -> None:
    """Nothing of any account (nor any secret or token) in the answer, the echoed path aside."""
    text = r.text
    if r.headers.get("content-type") == PROBLEM:
        problem = r.json()
        problem.pop("instance", None)  # RFC 9457's instance is the request path itself
        text = str(problem)
    for account in accounts:
        for field in ("id", "name", "tenant_id", "client_id", "token_url", "api_url"):
            assert account[field] not in text, (field, r.request.method, r.request.url.path)
    for secret in (CLIENT_SECRET, REFRESH_TOKEN, ACCESS_TOKEN, "refresh_token", "access_token"):
        assert secret not in text, (secret, r.request.method, r.request.url.path)


def mock_edge(azure: respx.MockRouter) -> None:
    """Azure AD's token endpoint and Dynamics' WhoAmI, both answering."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token(access=ACCESS_TOKEN))
    azure.get(f"{API_URL}/WhoAmI").respond(200, json=WHOAMI)
    azure.route(url__startswith=f"{API_URL}/").respond(200, json=WHOAMI)  # what the proxy forwards


async def prepared(running: Running, azure: respx.MockRouter) -> tuple[dict[str, Any], dict[str, Any]]:
    """An account with a refresh token (Azure answers its refresh) and a managed client key."""
    mock_edge(azure)
    account = await new_account(running)
    key = await new_key(running, role="client")
    return account, key


# -- no key, wrong keys -------------------------------------------------------------------------------


async def test_every_operation_without_a_key_is_401_except_the_public_ones(
    running: Running, azure: respx.MockRouter
) -> None:
    """No Authorization header: 401 problem+json with WWW-Authenticate on all but the public endpoints."""
    account, key = await prepared(running, azure)
    before = await snapshot(running)
    checked = 0
    for method, template in await operations(running):
        path = fill(template, account["id"], key["id"])
        r = await running.client.request(method, path, json=body_for(method, template))
        if template in PUBLIC:
            assert r.status_code not in (401, 403), (method, template, r.status_code)
            continue
        assert r.status_code == 401, (method, template, r.status_code, r.text[:200])
        assert r.headers["content-type"] == PROBLEM
        assert r.json()["code"] == "unauthorized"
        assert r.headers["www-authenticate"].lower().startswith("bearer")
        assert_no_account_data(r, account)
        checked += 1
    assert checked >= 15
    for path in (
        "/docs",
        "/openapi.json",
        "/docs/static/swagger-ui-bundle.js",
        "/healthz",
        "/readyz",
        "/metrics",
    ):
        assert (await running.client.get(path)).status_code == 200, path
    assert await snapshot(running) == before
    assert not azure.calls


async def test_every_operation_with_a_wrong_key_is_401(running: Running, azure: respx.MockRouter) -> None:
    """Unknown, truncated, extended, case-changed and revoked keys: 401 on every protected operation."""
    account, key = await prepared(running, azure)
    revoked = await new_key(running, role="admin")
    assert (await running.client.delete(f"/keys/{revoked['id']}", headers=admin())).status_code == 204
    # A token in the cache: the token route's fast path is asked too, and must not serve it.
    assert (await running.client.get(f"/accounts/{account['id']}/token", headers=client())).status_code == 200
    before = await snapshot(running)
    wrong_keys = {
        "random": "tbk_" + secrets.token_urlsafe(32),
        "admin-last-char": ADMIN_KEY[:-1] + ("x" if ADMIN_KEY[-1] != "x" else "y"),
        "admin-truncated": ADMIN_KEY[:-1],
        "admin-extended": ADMIN_KEY + "0",
        "admin-upper": ADMIN_KEY.upper(),
        "client-prefix": CLIENT_KEY[:8],
        "managed-prefix": key["prefix"],
        "revoked-admin": revoked["key"],
        "hash-of-admin": hashlib.sha256(ADMIN_KEY.encode()).hexdigest(),
    }
    for label, wrong in wrong_keys.items():
        for method, template in await operations(running):
            if template in PUBLIC:
                continue
            path = fill(template, account["id"], key["id"])
            r = await running.client.request(
                method, path, json=body_for(method, template), headers=bearer(wrong)
            )
            assert r.status_code == 401, (label, method, template, r.status_code, r.text[:200])
            assert r.json()["code"] == "unauthorized"
            assert_no_account_data(r, account)
    assert await snapshot(running) == before
    assert len(azure.calls) == 1


# -- client keys ----------------------------------------------------------------------------------------


async def test_a_client_key_is_403_on_admin_operations_and_gets_tokens(
    running: Running, azure: respx.MockRouter
) -> None:
    """Environment and managed client keys: 403 with no data wherever admin is needed, 200 on the token."""
    account, key = await prepared(running, azure)
    # The first token fetch refreshes (and rotates the refresh token: VERSION moves); after it,
    # nothing a client key does may change anything.
    assert (await running.client.get(f"/accounts/{account['id']}/token", headers=client())).status_code == 200
    before = await snapshot(running)
    for label, headers in (("env", client()), ("managed", bearer(key["key"]))):
        for method, template in await operations(running):
            if template in PUBLIC:
                continue
            path = fill(template, account["id"], key["id"])
            r = await running.client.request(method, path, json=body_for(method, template), headers=headers)
            if template == TOKEN_PATH:
                assert r.status_code == 200, (label, r.text[:200])
                assert r.json()["access_token"] == ACCESS_TOKEN
                assert r.headers["cache-control"] == "no-store"
                continue
            if template == PROXY_PATH:
                assert r.status_code == 200, (label, method, r.text[:200])
                assert ACCESS_TOKEN not in r.text
                continue
            assert r.status_code == 403, (label, method, template, r.status_code, r.text[:200])
            assert r.headers["content-type"] == PROBLEM
            assert r.json()["code"] == "forbidden"
            assert_no_account_data(r, account)
        default = await running.client.get("/accounts/default/token", headers=headers)
        assert default.status_code == 404  # no default account yet: a 404, not a 403
    assert await snapshot(running) == before
    token_calls = [c for c in azure.calls if str(c.request.url) == TOKEN_URL_V1]
    assert len(token_calls) == 1  # one refresh, then the cache


async def test_the_admin_key_is_never_refused(running: Running, azure: respx.MockRouter) -> None:
    """Sanity for the tests above: with the admin key no operation answers 401 or 403."""
    mock_edge(azure)
    for method, template in await operations(running):
        account = await new_account(running)  # fresh each time: DELETE and PATCH change them
        key = await new_key(running)
        path = fill(template, account["id"], key["id"])
        r = await running.client.request(method, path, json=body_for(method, template), headers=admin())
        assert r.status_code not in (401, 403), (method, template, r.status_code, r.text[:200])


async def test_a_body_is_not_parsed_before_the_key_is_checked(
    running: Running, azure: respx.MockRouter
) -> None:
    """Without a valid key the answer is 401 (a client key: 403) whatever the body, even broken JSON."""
    account, key = await prepared(running, azure)
    # The token first (its refresh moves VERSION): the proxy's requests then change nothing stored.
    assert (await running.client.get(f"/accounts/{account['id']}/token", headers=client())).status_code == 200
    before = await snapshot(running)
    wrong: list[str] = []
    for method, template in await operations(running):
        if template in PUBLIC or method not in ("POST", "PATCH"):
            continue
        path = fill(template, account["id"], key["id"])
        # A client key may call the proxy: what it sends goes upstream as it is (not parsed here).
        client_expected = 200 if template == PROXY_PATH else 403
        for headers, expected in (({}, 401), (bearer("wrong"), 401), (client(), client_expected)):
            r = await running.client.request(
                method, path, content=b"{broken", headers={**headers, "content-type": "application/json"}
            )
            if r.status_code != expected:
                wrong.append(
                    f"{method} {template} with {headers or 'no key'}: {r.status_code}, expected {expected}"
                )
    assert not wrong, "\n".join(wrong)
    assert await snapshot(running) == before


# -- scoped keys ------------------------------------------------------------------------------------------


def _shape(r: httpx.Response) -> tuple[int, str, dict[str, Any]]:
    problem = r.json()
    problem.pop("instance", None)
    return r.status_code, r.headers["content-type"], problem


async def test_a_scoped_key_outside_its_scope_gets_what_a_missing_account_gets(
    running: Running, azure: respx.MockRouter
) -> None:
    """A key scoped to A asking for B's token: 404 account_not_found, the same answer as for no account."""
    mock_edge(azure)
    a = await new_account(running)
    b = await new_account(running, default_account=True)
    scoped = await new_key(running, role="client", accounts=[a["id"]])
    headers = bearer(scoped["key"])
    # B's token is in the cache, so the fast path is asked first and must refuse too.
    assert (await running.client.get(f"/accounts/{b['id']}/token", headers=admin())).status_code == 200
    missing = str(uuid.uuid4())
    for query in ("", "?min_ttl=0", "?min_ttl=3600", "?min_ttl=x"):
        outside = await running.client.get(f"/accounts/{b['id']}/token{query}", headers=headers)
        absent = await running.client.get(f"/accounts/{missing}/token{query}", headers=headers)
        if query == "?min_ttl=x":
            assert outside.status_code == 422  # validation comes first, for both alike
        else:
            assert outside.status_code == 404, outside.text
            assert outside.json()["code"] == "account_not_found"
        assert _shape(outside) == _shape(absent)
        assert set(outside.headers) - {"x-request-id"} == set(absent.headers) - {"x-request-id"}
        assert_no_account_data(outside, b)
    default = await running.client.get("/accounts/default/token", headers=headers)  # B is the default
    assert _shape(default) == _shape(await running.client.get(f"/accounts/{missing}/token", headers=headers))
    inside = await running.client.get(f"/accounts/{a['id']}/token", headers=headers)
    assert inside.status_code == 200
    assert inside.json()["account_id"] == a["id"]
    for method, template in (("GET", "/accounts/{account_id}"), ("GET", "/accounts/{account_id}/events")):
        r = await running.client.request(method, fill(template, b["id"], scoped["id"]), headers=headers)
        assert r.status_code == 403
        assert_no_account_data(r, b)


async def test_a_scoped_admin_key_cannot_reach_beyond_its_scope(
    running: Running, azure: respx.MockRouter
) -> None:
    """An admin key scoped to A is refused, or held to A: B is 404 and no unscoped key is minted."""
    mock_edge(azure)
    a = await new_account(running)
    b = await new_account(running)
    made = await running.client.post(
        "/keys", json={"name": "scoped-admin", "role": "admin", "accounts": [a["id"]]}, headers=admin()
    )
    if made.status_code == 422:
        return  # refusing scoped admin keys outright keeps the promise too
    assert made.status_code == 201, made.text
    headers = bearer(made.json()["key"])
    before = await snapshot(running)
    leaks: list[str] = []
    listed = await running.client.get("/accounts", headers=headers)
    if listed.status_code == 200 and b["id"] in listed.text:
        leaks.append("GET /accounts lists B")
    minted = await running.client.post(
        "/keys", json={"name": "escalated", "role": "admin", "accounts": None}, headers=headers
    )
    if minted.status_code == 201:
        leaks.append("POST /keys minted an unscoped admin key")
    for method, template in (
        ("GET", "/accounts/{account_id}"),
        ("GET", "/accounts/{account_id}/events"),
        ("PATCH", "/accounts/{account_id}"),
        ("DELETE", "/accounts/{account_id}"),
        ("POST", "/accounts/{account_id}/test"),
        ("GET", "/accounts/{account_id}/token"),
    ):
        r = await running.client.request(
            method, fill(template, b["id"], ""), json=body_for(method, template), headers=headers
        )
        if r.status_code not in (403, 404):
            leaks.append(f"{method} {template} for B -> {r.status_code}")
    assert not leaks, "a key scoped to A reached beyond A:\n" + "\n".join(leaks)
    assert await snapshot(running) == before


# -- the time to reject a key -----------------------------------------------------------------------------


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    return {label: statistics.median(values) for label, values in samples.items()}


async def test_the_time_to_reject_a_key_does_not_depend_on_how_much_of_it_is_right(
    tmp_path: Path, sqlite_url: str, run_app: Callable[..., Any]
) -> None:
    """Coarse timing check: a wrong key sharing all but its last character with the admin key is
    rejected as fast as one sharing none.

    Medians of 2,000 interleaved requests each through the whole ASGI stack (fast path and FastAPI)
    may differ by at most max(20 %, 50 µs), and medians of 20,000 direct ``KeyStore.lookup`` calls by
    at most max(25 %, 2 µs). This only catches a gross leak (a byte-by-byte comparison of raw keys
    with an early exit); the real guarantee is the design in service/auth.py: the presented key is
    hashed in full (SHA-256) and the digests are compared with ``hmac.compare_digest``, so no step
    depends on how many leading characters are right.
    """
    await migrate.upgrade(sqlite_url)
    async with run_app(make_settings(sqlite_url, tmp_path)) as running:
        none_right = "".join("Z" if ch != "Z" else "Y" for ch in ADMIN_KEY)
        all_but_last = ADMIN_KEY[:-1] + ("x" if ADMIN_KEY[-1] != "x" else "y")
        assert len(none_right) == len(all_but_last) == len(ADMIN_KEY)
        assert not any(x == y for x, y in zip(none_right, ADMIN_KEY, strict=True))
        wrong = {"none_right": none_right, "all_but_last": all_but_last}
        path = f"/accounts/{uuid.uuid4()}/token"  # the token route: the fast path looks the key up too

        async def once(key: str) -> float:
            started = time.perf_counter()
            r = await running.client.get(path, headers=bearer(key))
            elapsed = time.perf_counter() - started
            assert r.status_code == 401
            return elapsed

        for key in (*wrong.values(), *wrong.values()) * 50:  # warm up
            await once(key)
        samples: dict[str, list[float]] = {label: [] for label in wrong}
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for i in range(2_000):
                order = list(wrong.items()) if i % 2 == 0 else list(reversed(wrong.items()))
                for label, key in order:
                    samples[label].append(await once(key))
                if i % 200 == 0:
                    await asyncio.sleep(0)
        finally:
            if gc_was_enabled:
                gc.enable()
        http = _medians(samples)
        bound = max(0.2 * min(http.values()), 50e-6)
        assert abs(http["none_right"] - http["all_but_last"]) < bound, {
            k: f"{v * 1e6:.1f} µs" for k, v in http.items()
        }

        keystore = running.ctx.keystore
        direct: dict[str, list[float]] = {label: [] for label in wrong}
        for i in range(20_000):
            order = list(wrong.items()) if i % 2 == 0 else list(reversed(wrong.items()))
            for label, key in order:
                started = time.perf_counter_ns()
                found = keystore.lookup(key)
                direct[label].append((time.perf_counter_ns() - started) / 1e9)
                assert found is None
        lookup = _medians(direct)
        bound = max(0.25 * min(lookup.values()), 2e-6)
        assert abs(lookup["none_right"] - lookup["all_but_last"]) < bound, {
            k: f"{v * 1e9:.0f} ns" for k, v in lookup.items()
        }
