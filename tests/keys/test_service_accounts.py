"""Kubernetes service-account callers: bindings, the accept/refuse matrix, JWKS rotation, TokenReview.

The cluster is ``tests/keys/fake_issuer.py`` in its own process (discovery, JWKS, TokenReview); the
signing keys stay here. Azure AD is the strict respx router, with the fake issuer passed through.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service import migrate
from service.keys import k8s
from tests.conftest import (
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    make_settings,
    sql_statements,
    v1_token,
)
from tests.keys.fake_issuer import FakeIssuerHandle, SigningKey, claims_for, running_fake_issuer

ACCESS = "at-for-service-accounts"
NS, SA = "contact-center", "scenario-engine"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def issuer() -> Iterator[FakeIssuerHandle]:
    with running_fake_issuer() as handle:
        yield handle


@pytest.fixture
def signing(issuer: FakeIssuerHandle) -> SigningKey:
    key = SigningKey("RS256")
    issuer.publish(key, SigningKey("ES256", kid="es-" + key.kid))
    return key


@pytest.fixture
def edge(azure: respx.MockRouter, issuer: FakeIssuerHandle) -> respx.MockRouter:
    azure.route(url__startswith=issuer.url).pass_through()
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token(ACCESS, "rt-2"))
    return azure


@pytest.fixture
async def running(
    sqlite_url: str,
    tmp_path: Path,
    issuer: FakeIssuerHandle,
    signing: SigningKey,
    edge: respx.MockRouter,
    run_app: Callable[..., Any],
) -> AsyncIterator[Running]:
    await migrate.upgrade(sqlite_url)
    settings = make_settings(sqlite_url, tmp_path, k8s_issuer=issuer.url, allow_http=True)
    async with run_app(settings) as app:
        yield app


async def new_account(running: Running) -> str:
    r = await running.client.post("/accounts", json=account_body(), headers=admin())
    assert r.status_code == 201, r.text
    account_id: str = r.json()["id"]
    return account_id


async def bind(running: Running, namespace: str = NS, name: str = SA, **body: Any) -> dict[str, Any]:
    r = await running.client.post(
        "/service-accounts", json={"namespace": namespace, "name": name, **body}, headers=admin()
    )
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


# -- bindings -------------------------------------------------------------------------------------


async def test_bindings_crud_and_duplicate_is_409(running: Running) -> None:
    """POST/GET/PATCH/DELETE /service-accounts answer as the contract says; (namespace, name) is unique."""
    account_id = await new_account(running)
    created = await bind(running, accounts=[account_id])
    assert set(created) == {"id", "namespace", "name", "role", "accounts", "created_at", "last_used_at"}
    assert (created["namespace"], created["name"], created["role"]) == (NS, SA, "client")
    assert created["accounts"] == [account_id]
    r = await running.client.post(
        "/service-accounts", json={"namespace": NS, "name": SA, "role": "admin"}, headers=admin()
    )
    assert r.status_code == 409
    assert r.json()["code"] == "name_conflict"
    listed = (await running.client.get("/service-accounts", headers=admin())).json()["items"]
    assert [b["id"] for b in listed] == [created["id"]]
    r = await running.client.patch(
        f"/service-accounts/{created['id']}", json={"accounts": None}, headers=admin()
    )
    assert r.status_code == 200
    assert r.json()["accounts"] is None
    r = await running.client.patch(
        f"/service-accounts/{created['id']}", json={"role": "admin"}, headers=admin()
    )
    assert r.json()["role"] == "admin"
    assert (
        await running.client.get(f"/service-accounts/{created['id']}", headers=admin())
    ).status_code == 200
    assert (
        await running.client.delete(f"/service-accounts/{created['id']}", headers=admin())
    ).status_code == 204
    r = await running.client.get(f"/service-accounts/{created['id']}", headers=admin())
    assert r.status_code == 404
    assert r.json()["code"] == "service_account_not_found"


@pytest.mark.parametrize(
    "body",
    [
        {"namespace": "Bad_NS", "name": SA},
        {"namespace": NS, "name": "-bad"},
        {"namespace": NS, "name": SA, "role": "owner"},
        {"namespace": NS, "name": SA, "role": "admin", "accounts": []},
        {"namespace": NS, "name": SA, "accounts": ["no-such-account"]},
        {"namespace": NS, "name": SA, "extra": 1},
    ],
)
async def test_invalid_bindings_are_422_and_change_nothing(running: Running, body: dict[str, Any]) -> None:
    """Bad names, roles, scoped admins, unknown accounts and unknown fields: 422, no binding made."""
    r = await running.client.post("/service-accounts", json=body, headers=admin())
    assert r.status_code == 422, r.text
    assert (await running.client.get("/service-accounts", headers=admin())).json()["items"] == []


# -- the accept/refuse matrix ---------------------------------------------------------------------


async def test_a_bound_service_account_gets_tokens_and_a_hit_is_a_lookup(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """A valid RS256 token of a bound account gets a token; later calls hit the fast path, no SQL, no JWKS."""
    account_id = await new_account(running)
    await bind(running, accounts=[account_id])
    token = signing.sign(claims_for(issuer.url, NS, SA))
    r = await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == ACCESS
    fetches = running.ctx.verifier.fetches
    with sql_statements(running) as statements:
        for _ in range(20):
            hit = await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
            assert hit.status_code == 200
            assert "x-request-id" not in hit.headers  # answered by the fast path
    assert statements == []
    assert running.ctx.verifier.fetches == fetches
    r = await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
    assert r.status_code == 200


async def test_es256_tokens_are_accepted(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """A token signed by the JWKS's P-256 key (ES256) is accepted like an RS256 one."""
    account_id = await new_account(running)
    await bind(running, accounts=None)
    es = SigningKey("ES256")
    issuer.publish(signing, es)  # before this app's first fetch
    token = es.sign(claims_for(issuer.url, NS, SA))
    assert (
        await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
    ).status_code == 200


def _hs256_with_public_key(signing: SigningKey, claims: dict[str, Any]) -> str:
    """The algorithm-confusion attack: HS256 keyed with the RSA public key's PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = signing.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": signing.kid}).encode())
    body = _b64(json.dumps(claims).encode())
    mac = hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(mac)}"


def _tampered(token: str) -> str:
    head, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["kubernetes.io"]["namespace"] = "kube-system"
    return f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"


def _refused_tokens(issuer: str, signing: SigningKey) -> dict[str, str]:
    now = int(time.time())
    good = claims_for(issuer, NS, SA)
    alg_none = _b64(json.dumps({"alg": "none", "kid": signing.kid}).encode()) + "."
    alg_none += _b64(json.dumps(good).encode()) + "."
    return {
        "alg-none": alg_none,
        "hs256": _hs256_with_public_key(signing, good),
        "unknown-key": SigningKey("RS256").sign(good),
        "known-kid-other-key": SigningKey("RS256", kid=signing.kid).sign(good),
        "tampered": _tampered(signing.sign(good)),
        "wrong-iss": signing.sign(claims_for("https://other.example", NS, SA)),
        "wrong-aud": signing.sign(claims_for(issuer, NS, SA, audience=["vault", "api"])),
        "expired-beyond-leeway": signing.sign(claims_for(issuer, NS, SA, exp=now - 61 - 5)),
        "nbf-beyond-leeway": signing.sign(claims_for(issuer, NS, SA, nbf=now + 61 + 5)),
        "no-exp": signing.sign({k: v for k, v in good.items() if k != "exp"}),
        "unknown-binding": signing.sign(claims_for(issuer, NS, "someone-else")),
        "other-namespace": signing.sign(claims_for(issuer, "other", SA)),
        "no-kubernetes-claim": signing.sign({k: v for k, v in good.items() if k != "kubernetes.io"}),
    }


async def test_the_refuse_matrix_is_401_for_every_case(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey, caplog: pytest.LogCaptureFixture
) -> None:
    """alg none, HS256, unknown key, tampered, wrong iss/aud, expired or not yet valid beyond the
    leeway, unknown binding: 401 on the token route and an admin route; nothing logs the token."""
    caplog.set_level(logging.DEBUG)
    account_id = await new_account(running)
    await bind(running, role="admin")
    refused = _refused_tokens(issuer.url, signing)
    for label, token in refused.items():
        for path in (f"/accounts/{account_id}/token", "/accounts"):
            r = await running.client.get(path, headers=bearer(token))
            assert r.status_code == 401, (label, path, r.status_code, r.text)
            assert r.json()["code"] == "unauthorized"
            assert token not in r.text
    assert running.ctx.keystore.remembered_tokens == 0
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        for token in refused.values():
            assert token not in text
            signature = token.split(".")[2]
            assert not signature or signature not in text


async def test_the_leeway_is_60_seconds(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """exp 30 s ago and nbf 30 s ahead are still accepted (60 s of clock skew)."""
    await bind(running, role="admin")
    now = int(time.time())
    for claims in (
        claims_for(issuer.url, NS, SA, exp=now - 30),
        claims_for(issuer.url, NS, SA, nbf=now + 30),
    ):
        assert (
            await running.client.get("/accounts", headers=bearer(signing.sign(claims)))
        ).status_code == 200


async def test_a_client_binding_is_403_on_admin_routes_and_a_scope_is_404_like_absent(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """A client binding: 403 on admin endpoints (body unread); outside its scope exactly a missing account."""
    mine, other = await new_account(running), await new_account(running)
    await bind(running, accounts=[mine])
    token = signing.sign(claims_for(issuer.url, NS, SA))
    r = await running.client.get("/accounts", headers=bearer(token))
    assert r.status_code == 403
    r = await running.client.post("/service-accounts", content=b"{not json", headers=bearer(token))
    assert r.status_code == 403
    outside = await running.client.get(f"/accounts/{other}/token", headers=bearer(token))
    missing = await running.client.get(f"/accounts/{uuid.uuid4()}/token", headers=bearer(token))
    assert outside.status_code == missing.status_code == 404
    assert outside.json()["code"] == missing.json()["code"] == "account_not_found"
    assert outside.json()["detail"] == missing.json()["detail"]
    assert (await running.client.get(f"/accounts/{mine}/token", headers=bearer(token))).status_code == 200


async def test_default_resolves_inside_the_scope(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """``default`` works for a binding as for a key: only when the default account is in its scope."""
    mine = await new_account(running)
    r = await running.client.patch(f"/accounts/{mine}", json={"default_account": True}, headers=admin())
    assert r.status_code == 200, r.text
    binding = await bind(running, accounts=[mine])
    token = signing.sign(claims_for(issuer.url, NS, SA))
    assert (await running.client.get("/accounts/default/token", headers=bearer(token))).status_code == 200
    other = await new_account(running)
    r = await running.client.patch(
        f"/service-accounts/{binding['id']}", json={"accounts": [other]}, headers=admin()
    )
    assert r.status_code == 200
    assert (await running.client.get("/accounts/default/token", headers=bearer(token))).status_code == 404


async def test_a_deleted_binding_stops_its_remembered_tokens_at_once(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """DELETE on this replica: the remembered token is refused on the next request (fast path too)."""
    account_id = await new_account(running)
    binding = await bind(running)
    token = signing.sign(claims_for(issuer.url, NS, SA))
    assert (
        await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
    ).status_code == 200
    assert (
        await running.client.delete(f"/service-accounts/{binding['id']}", headers=admin())
    ).status_code == 204
    assert (
        await running.client.get(f"/accounts/{account_id}/token", headers=bearer(token))
    ).status_code == 401


async def test_last_used_at_is_written_for_bindings(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """A binding's ``last_used_at`` is set after use, like a key's."""
    binding = await bind(running, role="admin")
    token = signing.sign(claims_for(issuer.url, NS, SA))
    assert (await running.client.get("/accounts", headers=bearer(token))).status_code == 200
    await running.ctx.background.sync_once()
    r = await running.client.get(f"/service-accounts/{binding['id']}", headers=admin())
    assert r.json()["last_used_at"] is not None


# -- the JWKS ---------------------------------------------------------------------------------------


async def test_a_rotated_cluster_key_works_and_unknown_kids_refetch_at_most_every_30_s(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token signed by a new cluster key works without a restart (one refetch); more unknown kids
    within 30 s make no further fetch; after 30 s one more."""
    await bind(running, role="admin")
    verifier = running.ctx.verifier
    assert (
        await running.client.get("/accounts", headers=bearer(signing.sign(claims_for(issuer.url, NS, SA))))
    ).status_code == 200
    before = issuer.stats()["counts"]["jwks"]
    rotated = SigningKey("RS256")
    issuer.publish(signing, rotated)
    now = time.monotonic()
    monkeypatch.setattr(k8s.time, "monotonic", lambda: now + k8s.REFETCH_SECONDS)
    token = rotated.sign(claims_for(issuer.url, NS, SA))
    assert (await running.client.get("/accounts", headers=bearer(token))).status_code == 200
    assert issuer.stats()["counts"]["jwks"] == before + 1
    for _ in range(20):
        forged = SigningKey("RS256").sign(claims_for(issuer.url, NS, SA))
        assert (await running.client.get("/accounts", headers=bearer(forged))).status_code == 401
    assert issuer.stats()["counts"]["jwks"] == before + 1
    monkeypatch.setattr(k8s.time, "monotonic", lambda: now + 2 * k8s.REFETCH_SECONDS + 1)
    forged = SigningKey("RS256").sign(claims_for(issuer.url, NS, SA))
    assert (await running.client.get("/accounts", headers=bearer(forged))).status_code == 401
    assert issuer.stats()["counts"]["jwks"] == before + 2
    assert verifier.fetches >= 2


async def test_an_unreachable_jwks_is_503_not_401(
    sqlite_url: str,
    tmp_path: Path,
    signing: SigningKey,
    issuer: FakeIssuerHandle,
    run_app: Callable[..., Any],
) -> None:
    """No JWKS ever fetched and the issuer unreachable: the caller gets 503 with Retry-After, not 401."""
    await migrate.upgrade(sqlite_url)
    settings = make_settings(
        sqlite_url, tmp_path, k8s_issuer=issuer.url, k8s_jwks_url="http://127.0.0.1:9/jwks", allow_http=True
    )
    async with run_app(settings) as app:
        token = signing.sign(claims_for(issuer.url, NS, SA))
        r = await app.client.get("/accounts", headers=bearer(token))
        assert r.status_code == 503
        assert r.json()["code"] == "issuer_unavailable"
        assert "retry-after" in r.headers


def test_the_jwks_url_must_be_https(tmp_path: Path) -> None:
    """An http:// issuer or JWKS URL is refused at start-up unless BROKER_ALLOW_HTTP."""
    from service.errors import ConfigurationError
    from service.keys.store import KeyStore

    for overrides in (
        {"k8s_issuer": "http://issuer.example"},
        {"k8s_issuer": "https://i.example", "k8s_jwks_url": "http://j.example/jwks"},
    ):
        settings = make_settings("sqlite+aiosqlite://", tmp_path, **overrides)
        with pytest.raises(ConfigurationError, match="https"):
            k8s.ServiceAccountVerifier(settings, httpx.AsyncClient(), KeyStore())


# -- TokenReview ------------------------------------------------------------------------------------


async def test_token_review_is_asked_once_per_token_and_a_refusal_is_401(
    sqlite_url: str, tmp_path: Path, issuer: FakeIssuerHandle, signing: SigningKey, edge: respx.MockRouter,
    run_app: Callable[..., Any],
) -> None:  # fmt: skip
    """With BROKER_K8S_TOKEN_REVIEW the API server is asked once per token (with the reviewer's own
    token as bearer); a token it no longer authenticates (deleted pod) is 401."""
    await migrate.upgrade(sqlite_url)
    reviewer = tmp_path / "token"
    reviewer.write_text("reviewer-token-value\n")
    settings = make_settings(
        sqlite_url, tmp_path, k8s_issuer=issuer.url, allow_http=True, k8s_token_review=True,
        k8s_api_url=issuer.url, k8s_token_file=reviewer,
    )  # fmt: skip
    async with run_app(settings) as app:
        await bind(app, role="admin")
        before = issuer.stats()["counts"]["review"]
        token = signing.sign(claims_for(issuer.url, NS, SA))
        for _ in range(5):
            assert (await app.client.get("/accounts", headers=bearer(token))).status_code == 200
        stats = issuer.stats()
        assert stats["counts"]["review"] == before + 1
        assert stats["bearers"][-1] == "Bearer reviewer-token-value"
        deleted_pod = signing.sign(claims_for(issuer.url, NS, SA))
        issuer.revoke(deleted_pod)
        assert (await app.client.get("/accounts", headers=bearer(deleted_pod))).status_code == 401
        assert issuer.stats()["counts"]["review"] == before + 2


async def test_an_unbound_service_account_costs_one_query_per_sync(
    running: Running, issuer: FakeIssuerHandle, signing: SigningKey
) -> None:
    """Valid tokens of an unbound service account: 401 each, one lookup until the next sync; a
    binding made since is then found."""
    with sql_statements(running) as statements:
        for _ in range(50):
            token = signing.sign(claims_for(issuer.url, NS, "unbound"))
            assert (await running.client.get("/accounts", headers=bearer(token))).status_code == 401
    # Counted on the bindings table: the background jobs (e.g. the credential expiry scan) may query too.
    lookups = [
        s for s in statements if s.lstrip().upper().startswith("SELECT") and "broker_service_accounts" in s
    ]
    assert len(lookups) == 1
    await bind(running, NS, "unbound", role="admin")
    token = signing.sign(claims_for(issuer.url, NS, "unbound"))
    assert (await running.client.get("/accounts", headers=bearer(token))).status_code == 200
