"""The fake token endpoint checks client assertions as strictly as Azure AD: what it accepts is
what the broker must send, and each refusal has Azure's error and AADSTS code."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest

from service.accounts import certificates
from tests.certs import Cert, make_cert, rsa_key
from tests.fake_idp import FakeIdpState, build_app
from tests.system.test_fake_idp import assert_azure_error

TENANT = "tenant-1"
BASE = "https://login.microsoftonline.com"
TOKEN_URL = f"{BASE}/{TENANT}/oauth2/v2.0/token"
SCOPE = "https://org.crm.dynamics.com/.default"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SUBJECT = "system:serviceaccount:broker:token-broker"


@pytest.fixture(scope="module")
def cert() -> Cert:
    return make_cert()


@pytest.fixture
def state(cert: Cert) -> FakeIdpState:
    fake = FakeIdpState()
    fake.add_client("cert-app", certificates=[cert.cert_pem])
    fake.add_client("fed-app", federated_subjects=[SUBJECT])
    return fake


@pytest.fixture
async def idp(state: FakeIdpState) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(state)), base_url=BASE) as c:
        yield c


def signed(
    cert: Cert, *, audience: str = TOKEN_URL, now: float | None = None, client_id: str = "cert-app"
) -> str:
    parsed = certificates.parse(cert.pem(), now=datetime.now(UTC).replace(tzinfo=None))
    return certificates.client_assertion(
        parsed, client_id=client_id, audience=audience, now=now or time.time()
    )


def form(assertion: str, client_id: str = "cert-app", **extra: str) -> dict[str, str]:
    body = {"grant_type": "client_credentials", "client_id": client_id, "scope": SCOPE}
    return body | {"client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion} | extra


async def post(idp: httpx.AsyncClient, data: dict[str, str]) -> httpx.Response:
    return await idp.post(f"/{TENANT}/oauth2/v2.0/token", data=data)


async def test_a_well_made_assertion_gets_a_token_once(idp: httpx.AsyncClient, cert: Cert) -> None:
    """The broker's assertion is accepted; the same assertion again (same jti) is refused."""
    assertion = signed(cert)
    assert (await post(idp, form(assertion))).status_code == 200
    assert_azure_error(await post(idp, form(assertion)), 401, "invalid_client", 7000272)


@pytest.mark.parametrize(
    ("make", "status", "error", "code"),
    [
        (
            lambda c: form(signed(c, audience=f"{BASE}/other/oauth2/v2.0/token")),
            401,
            "invalid_client",
            700211,
        ),
        (lambda c: form(signed(c, now=time.time() - 3600)), 401, "invalid_client", 700024),
        (lambda _c: form(signed(make_cert(1))), 401, "invalid_client", 700027),
        (lambda c: form(signed(c), client_secret="a-secret-too"), 401, "invalid_client", 7000219),
        (lambda c: form(signed(c, client_id="fed-app")), 401, "invalid_client", 700027),
        (lambda c: form(signed(c)) | {"client_assertion_type": "jwt"}, 400, "invalid_request", 50027),
        (lambda _c: form("not.a.jwt"), 401, "invalid_client", 50027),
        (
            lambda _c: {"grant_type": "client_credentials", "client_id": "cert-app", "scope": SCOPE},
            401,
            "invalid_client",
            7000218,
        ),
    ],
    ids=[
        "wrong_aud",
        "expired",
        "unknown_certificate",
        "secret_beside",
        "other_client",
        "bad_type",
        "malformed",
        "none",
    ],
)
async def test_bad_assertions_are_refused_as_azure_does(
    idp: httpx.AsyncClient, cert: Cert, make: Any, status: int, error: str, code: int
) -> None:
    """Wrong audience, expired, signed by an unknown certificate, a secret sent beside it, another
    client's, a wrong assertion type, malformed, or no credential at all: refused."""
    assert_azure_error(await post(idp, make(cert)), status, error, code)


def federated(
    *, aud: str = "api://AzureADTokenExchange", sub: str = SUBJECT, exp: float | None = None
) -> str:
    claims = {"aud": aud, "sub": sub, "iss": "https://oidc.example", "exp": int(exp or time.time() + 600)}
    return jwt.encode(claims, rsa_key(), algorithm="RS256")


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (federated, 200, None),
        (lambda: federated(aud="dynamics-token-broker"), 400, 700212),
        (lambda: federated(sub="system:serviceaccount:other:sa"), 400, 70021),
        (lambda: federated(exp=time.time() - 5), 401, 700024),
    ],
    ids=["ok", "wrong_audience", "wrong_subject", "expired"],
)
async def test_federated_tokens_need_the_exchange_audience_and_a_known_subject(
    idp: httpx.AsyncClient, token: Any, status: int, code: int | None
) -> None:
    """A federated credential matches on audience api://AzureADTokenExchange and subject; expired fails."""
    response = await post(idp, form(token(), client_id="fed-app"))
    if code is None:
        assert response.status_code == 200, response.text
    else:
        assert_azure_error(response, status, "invalid_client", code)
