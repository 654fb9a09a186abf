"""Credential kinds through the API: certificate and federated accounts, the replaced secret's
fallback, and expiry dates, against a fake Azure AD that checks every assertion strictly."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import respx

from service import migrate
from service.kit import sealing
from service.kit.crypto import DecryptionError
from service.models import Account, AccountCredential
from service.settings import Settings
from tests.certs import Cert, certificate, make_cert, rsa_key
from tests.conftest import CLIENT_SECRET, account_body, admin, client, make_settings
from tests.fake_idp import FakeIdpState, build_app

CLIENT_ID = account_body()["client_id"]
OLD, NEW = CLIENT_SECRET, "n3w-Client-Secret~value.456"
SUBJECT = "system:serviceaccount:broker:token-broker"


@pytest.fixture(scope="module")
def cert() -> Cert:
    return make_cert()


@pytest.fixture
def fake() -> FakeIdpState:
    return FakeIdpState()


@pytest.fixture
def idp(fake: FakeIdpState) -> Iterator[respx.MockRouter]:
    """Azure AD's login host answered by the fake IdP in process (strict respx: nothing else goes out)."""
    app = build_app(fake)

    async def forward(request: httpx.Request) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
            answer = await http.send(
                httpx.Request(request.method, request.url, headers=request.headers, content=request.content)
            )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        router.route(host="login.microsoftonline.com").mock(side_effect=forward)
        yield router


async def create(running: Any, **overrides: Any) -> dict[str, Any]:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def cc(**overrides: Any) -> dict[str, Any]:
    """An application-user account (client_credentials) without a secret, for the other kinds."""
    return {"grant_type": "client_credentials", "refresh_token": None, "client_secret": None} | overrides


async def token(running: Any, account_id: str, min_ttl: int | None = None) -> httpx.Response:
    query = f"?min_ttl={min_ttl}" if min_ttl is not None else ""
    return await running.client.get(f"/accounts/{account_id}/token{query}", headers=client())


async def events(running: Any, account_id: str) -> list[str]:
    r = await running.client.get(f"/accounts/{account_id}/events", headers=admin())
    return [e["kind"] for e in r.json()["items"]]


async def test_certificate_account_stores_the_pem_sealed_and_shows_only_public_facts(
    running: Any, cert: Cert
) -> None:
    """The PEM is write-only, stored encrypted and bound to its row and column; the response shows
    the x5t#S256 thumbprint and notAfter as credential_expires_at, no secret."""
    pem = cert.pem()
    r = await running.client.post(
        "/accounts", json=account_body(**cc(credential_type="certificate", certificate=pem)), headers=admin()
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["credential_type"] == "certificate"
    assert body["has_client_secret"] is False
    assert len(body["certificate_thumbprint"]) == 43
    assert body["credential_expires_at"] == cert.cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    assert body["client_secret_expires_at"] is None
    assert "certificate" not in body
    assert "BEGIN" not in r.text
    async with running.ctx.sessions() as session:
        row = await session.get(AccountCredential, body["id"])
    assert row is not None
    assert row.certificate is not None
    assert "PRIVATE KEY" not in row.certificate
    keyring = running.ctx.keyring
    assert sealing.unseal(keyring, sealing.CERTIFICATE, body["id"], row.certificate) == pem
    with pytest.raises(DecryptionError):
        sealing.unseal(keyring, sealing.CERTIFICATE, "another-account", row.certificate)
    with pytest.raises(DecryptionError):
        sealing.unseal(keyring, sealing.CLIENT_SECRET, body["id"], row.certificate)


def _expired(cert: Cert) -> str:
    return cert.key_pem() + Cert(cert.key, certificate(cert.key, days=-1, starts=timedelta(days=-9))).cert_pem


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        (
            lambda c: cc(credential_type="certificate", certificate=c.pem(), client_secret=OLD),
            "client_secret",
            "not used",
        ),
        (lambda c: {"certificate": c.pem()}, "certificate", "not used by credential_type 'client_secret'"),
        (lambda c: cc(credential_type="certificate"), "certificate", "is required"),
        (lambda c: cc(credential_type="certificate", certificate=_expired(c)), "certificate", "expired on"),
        (
            lambda c: cc(credential_type="certificate", certificate=c.key_pem() + make_cert(1).cert_pem),
            "certificate",
            "does not match",
        ),
        (
            lambda c: cc(
                credential_type="certificate",
                certificate="-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----",
            ),
            "certificate",
            "private key",
        ),
        (lambda c: cc(credential_type="federated", client_secret=OLD), "client_secret", "not used"),
        (
            lambda c: cc(credential_type="federated", client_secret_expires_at="2030-01-01T00:00:00Z"),
            "client_secret_expires_at",
            "not used",
        ),
        (lambda c: cc(credential_type="federated", certificate=c.pem()), "certificate", "not used"),
    ],
)
async def test_fields_of_another_kind_and_unusable_pems_are_422_and_change_nothing(
    running: Any, cert: Cert, overrides: Any, field: str, message: str
) -> None:
    """A field the account's kind does not use, a missing or unusable certificate: 422 with the field
    named and a plain message; nothing is stored and nothing of the PEM or secret is echoed."""
    body = account_body(**overrides(cert))
    r = await running.client.post("/accounts", json=body, headers=admin())
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["errors"][0]["loc"] == ["body", field]
    assert message in problem["detail"]
    assert "-----END" not in r.text
    assert OLD not in r.text
    for line in cert.pem().splitlines():
        assert line.startswith("-----") or line not in r.text
    assert (await running.client.get("/accounts", headers=admin())).json()["items"] == []


async def test_switching_kinds_erases_what_the_old_kind_stored(running: Any, cert: Cert) -> None:
    """PATCH to certificate drops the stored client secret; back to client_secret drops the
    certificate; a certificate field on a secret account is 422 and changes nothing."""
    account = await create(running)
    url = f"/accounts/{account['id']}"
    refused = await running.client.patch(url, json={"certificate": cert.pem()}, headers=admin())
    assert refused.status_code == 422
    r = await running.client.patch(
        url, json={"credential_type": "certificate", "certificate": cert.pem()}, headers=admin()
    )
    assert r.status_code == 200, r.text
    assert r.json()["has_client_secret"] is False
    assert r.json()["certificate_thumbprint"]
    async with running.ctx.sessions() as session:
        assert (await session.get(Account, account["id"])).client_secret is None  # type: ignore[union-attr]
    r = await running.client.patch(
        url, json={"credential_type": "client_secret", "client_secret": NEW}, headers=admin()
    )
    assert r.status_code == 200, r.text
    assert r.json()["certificate_thumbprint"] is None
    assert r.json()["credential_expires_at"] is None
    assert r.json()["has_previous_client_secret"] is False  # no secret to fall back to
    async with running.ctx.sessions() as session:
        row = await session.get(AccountCredential, account["id"])
    assert row is not None
    assert row.certificate is None


async def test_certificate_account_gets_tokens_from_a_strict_idp(
    running: Any, idp: respx.MockRouter, fake: FakeIdpState, cert: Cert
) -> None:
    """The fake IdP verifies each assertion (signature by a registered certificate, audience,
    lifetime, no replay): tokens come, refresh after refresh, with no secret sent."""
    fake.add_client(CLIENT_ID, certificates=[cert.cert_pem])
    account = await create(running, **cc(credential_type="certificate", certificate=cert.pem()))
    first = await token(running, account["id"])
    assert first.status_code == 200, first.text
    forced = await token(running, account["id"], min_ttl=3600)
    assert forced.status_code == 200, forced.text
    assert fake.counters["assertions"]["certificate"] == 2
    assert not fake.counters["errors"]


async def test_an_unknown_certificate_makes_the_account_invalid_credentials(
    running: Any, idp: respx.MockRouter, fake: FakeIdpState, cert: Cert
) -> None:
    """Azure not knowing the certificate (AADSTS700027): 409 invalid_credentials, stated on the account."""
    fake.add_client(CLIENT_ID, certificates=[make_cert(1).cert_pem])
    account = await create(running, **cc(credential_type="certificate", certificate=cert.pem()))
    r = await token(running, account["id"])
    assert r.status_code == 409
    assert r.json()["code"] == "invalid_credentials"
    got = (await running.client.get(f"/accounts/{account['id']}", headers=admin())).json()
    assert got["status"] == "invalid_credentials"
    assert "700027" in json.dumps(got["last_error"])


def federated_token(exp: float, sub: str = SUBJECT) -> str:
    claims = {"aud": "api://AzureADTokenExchange", "iss": "https://oidc.example", "sub": sub, "exp": int(exp)}
    return jwt.encode(claims, rsa_key(), algorithm="RS256")


@pytest.fixture
async def federated(sqlite_url: str, tmp_path: Path, run_app: Any) -> AsyncIterator[tuple[Any, Path]]:
    path = tmp_path / "azure-identity-token"
    await migrate.upgrade(sqlite_url)
    settings: Settings = make_settings(sqlite_url, tmp_path, federated_token_file=str(path))
    async with run_app(settings) as running:
        yield running, path


async def test_federated_account_sends_the_token_file_follows_its_rotation_and_recovers(
    federated: tuple[Any, Path], idp: respx.MockRouter, fake: FakeIdpState
) -> None:
    """The projected token is the assertion; when the kubelet rotates the file, the next refresh
    sends the new one; a missing file is invalid_credentials naming the setting, lifted once the
    file is back."""
    running, path = federated
    fake.add_client(CLIENT_ID, federated_subjects=[SUBJECT, "system:serviceaccount:broker:other"])
    path.write_text(federated_token(time.time() + 3600))
    account = await create(running, **cc(credential_type="federated"))
    assert account["credential_expires_at"] is None
    assert (await token(running, account["id"])).status_code == 200
    rotated = federated_token(time.time() + 7200, sub="system:serviceaccount:broker:other")
    path.write_text(rotated)
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert (await token(running, account["id"], min_ttl=3600)).status_code == 200
    assert fake.counters["assertions"]["federated"] == 2
    assert running.ctx.secrets.federated.reads == 2
    path.unlink()
    r = await token(running, account["id"], min_ttl=3600)
    assert r.status_code in (200, 409)  # the cached token may still satisfy the forced interval
    other = await create(running, **cc(credential_type="federated"))
    r = await token(running, other["id"])
    assert r.status_code == 409
    assert r.json()["code"] == "invalid_credentials"
    got = (await running.client.get(f"/accounts/{other['id']}", headers=admin())).json()
    assert got["status"] == "invalid_credentials"
    assert "BROKER_FEDERATED_TOKEN_FILE" in got["last_error"]["message"]
    assert rotated not in r.text
    assert rotated not in json.dumps(got)
    # Still broken: recovery changes nothing. Repaired: the account is ready again, tokens come.
    assert await running.ctx.background.federated_recovery_once() == []
    path.write_text(federated_token(time.time() + 3600))
    assert other["id"] in await running.ctx.background.federated_recovery_once()
    got = (await running.client.get(f"/accounts/{other['id']}", headers=admin())).json()
    assert got["status"] == "ready"
    assert (await token(running, other["id"])).status_code == 200


async def test_replaced_secret_falls_back_until_the_new_one_works(
    running: Any, idp: respx.MockRouter, fake: FakeIdpState
) -> None:
    """Azure first accepts only the old secret, then both, then only the new: every token request
    succeeds; the previous secret is used while the new one is refused, erased after the new one's
    first success; each switch is an event."""
    fake.add_client(CLIENT_ID, OLD)
    account = await create(running, **cc(client_secret=OLD))
    url = f"/accounts/{account['id']}"
    assert (await token(running, account["id"])).status_code == 200
    patched = await running.client.patch(url, json={"client_secret": NEW}, headers=admin())
    assert patched.json()["has_previous_client_secret"] is True
    r = await token(running, account["id"])  # Azure knows only the old one yet
    assert r.status_code == 200, r.text
    assert "client_secret_fallback" in await events(running, account["id"])
    assert (await running.client.get(url, headers=admin())).json()["has_previous_client_secret"] is True
    fake.add_client(CLIENT_ID, NEW, other_secrets=[OLD])  # propagated: both work
    assert (await token(running, account["id"], min_ttl=3600)).status_code == 200
    got = (await running.client.get(url, headers=admin())).json()
    assert got["has_previous_client_secret"] is False
    kinds = await events(running, account["id"])
    assert kinds.count("client_secret_switched") == 1
    assert kinds.count("client_secret_fallback") == 1
    fake.add_client(CLIENT_ID, NEW)  # the old one deleted in Azure
    running.ctx.settings.forced_refresh_interval_seconds = 0
    assert (await token(running, account["id"], min_ttl=3600)).status_code == 200
    assert fake.counters["errors"]["invalid_client"] == 1  # only the first request after the PATCH
    async with running.ctx.sessions() as session:
        row = await session.get(AccountCredential, account["id"])
    assert row is not None
    assert row.previous_client_secret is None


async def test_secret_expiry_is_listed_with_credential_expires_before(running: Any, cert: Cert) -> None:
    """client_secret_expires_at is writable and is the account's credential_expires_at; the list
    filtered by credential_expires_before holds exactly the accounts expiring before it."""
    soon = (datetime.now(UTC) + timedelta(days=5)).replace(microsecond=0)
    late = soon + timedelta(days=400)
    a = await create(running, name="a", client_secret_expires_at=soon.isoformat())
    b = await create(running, name="b", client_secret_expires_at=late.isoformat())
    c = await create(running, name="c", **cc(credential_type="certificate", certificate=cert.pem()))
    await create(running, name="d")
    assert (
        a["client_secret_expires_at"] == a["credential_expires_at"] == soon.isoformat().replace("+00:00", "Z")
    )

    async def expiring(before: datetime) -> list[str]:
        r = await running.client.get(
            "/accounts", params={"credential_expires_before": before.isoformat()}, headers=admin()
        )
        assert r.status_code == 200, r.text
        return [item["name"] for item in r.json()["items"]]

    assert await expiring(soon + timedelta(days=1)) == ["a"]
    assert await expiring(soon + timedelta(days=380)) == ["a", "c"]
    assert await expiring(late + timedelta(days=1)) == ["a", "b", "c"]
    bad = await running.client.get("/accounts?credential_expires_before=tomorrow", headers=admin())
    assert bad.status_code == 422
    # A new secret without a date clears the old secret's date.
    r = await running.client.patch(f"/accounts/{a['id']}", json={"client_secret": NEW}, headers=admin())
    assert r.json()["client_secret_expires_at"] is None
    assert b["id"]
    assert c["id"]


async def test_an_expiry_stage_is_claimed_once_whoever_scans(running: Any) -> None:
    """Two replicas scanning at once: the conditional claim lets one write the notice, and a
    credential replaced since the scan read it (a new date) is not claimed for the old one."""
    from service.accounts import expiry
    from service.accounts import repository as accounts_repo

    soon = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0)
    account = await create(running, client_secret_expires_at=soon.isoformat())
    now = datetime.now(UTC).replace(tzinfo=None)
    results = await asyncio.gather(*(expiry.scan(running.ctx.sessions, now) for _ in range(4)))
    assert sum(sent for sent, _ in results) == 1
    assert (await events(running, account["id"])).count("credential_expiring") == 1
    async with running.ctx.sessions() as session, session.begin():
        stale = soon.replace(tzinfo=None) - timedelta(days=1)
        claimed = await accounts_repo.claim_expiry_stage(
            session, account["id"], expires_at=stale, was="7d", stage="1d"
        )
    assert claimed is False
