"""Certificate and federated credentials at the HTTP edge, and the replaced secret's fallback.

Every assertion that goes out is decoded and its PS256 signature verified with the certificate's
public key; every header field and claim is checked; no request carries a secret beside it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest
import respx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service import errors
from service.accounts import certificates
from service.accounts.credentials import CertificateAssertion, Unusable
from service.accounts.federated import FederatedTokenFile
from service.idp.azure_ad import AzureADClient, ClientCredentials, TokenGrant
from service.kit.outbound import OutboundPolicy
from tests.certs import Cert, certificate, make_cert, rsa_key

NOW = time.time()  # the certificate's validity is real time; the client's clock is fixed to it
TENANT = "7f3b7d01-a049-4dfd-9dbd-d394e711c3a0"
CLIENT_ID = "dc40e7c1-86fa-484e-a38b-bec0d31c945a"
LOGIN = f"https://login.microsoftonline.com/{TENANT}"
TOKEN_URLS = {"v1": f"{LOGIN}/oauth2/token", "v2": f"{LOGIN}/oauth2/v2.0/token"}
API_URL = "https://org.crm.dynamics.com/api/data/v9.2"
POLICY = OutboundPolicy(allowed_hosts=["login.microsoftonline.com", "*.crm.dynamics.com"])
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
NEW, OLD = "new-secret-value~0123456789", "old-secret-value~9876543210"
OPS = {
    "refresh": lambda c, cr: c.refresh(cr, "0.refresh-token"),
    "client_credentials": lambda c, cr: c.client_credentials(cr),
    "redeem_code": lambda c, cr: c.redeem_code(
        cr, code="code-1", redirect_uri="https://b/cb", code_verifier="v" * 43
    ),
}


def ok(_request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"token_type": "Bearer", "access_token": "at", "expires_in": 3599})


def bad_client(code: int = 7000215) -> httpx.Response:
    description = f"AADSTS{code}: Invalid client secret provided.\r\nTrace ID: 0"
    return httpx.Response(
        401, json={"error": "invalid_client", "error_description": description, "error_codes": [code]}
    )


def form_of(request: httpx.Request) -> dict[str, str]:
    parsed = parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)
    assert all(len(v) == 1 for v in parsed.values())
    return {k: v[0] for k, v in parsed.items()}


def creds(style: str = "v1", **kw: Any) -> ClientCredentials:
    values: dict[str, Any] = {"client_secret": None} | kw
    return ClientCredentials(
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        token_url=TOKEN_URLS[style],
        authorization_url=f"{LOGIN}/oauth2/authorize",
        api_url=API_URL,
        **values,
    )


@pytest.fixture
async def client() -> AsyncIterator[AzureADClient]:
    async with httpx.AsyncClient() as http:
        yield AzureADClient(http, POLICY, timeout=5.0, clock=lambda: NOW)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=True) as mock:
        yield mock


@pytest.fixture(scope="module")
def cert() -> Cert:
    return make_cert()


def signer(cert: Cert) -> CertificateAssertion:
    return CertificateAssertion(
        CLIENT_ID, certificates.parse(cert.pem(), now=datetime.now(UTC).replace(tzinfo=None))
    )


def x5t_s256(cert: Cert) -> str:
    der = cert.cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@pytest.mark.parametrize("style", ["v1", "v2"])
@pytest.mark.parametrize("op", list(OPS))
async def test_every_grant_sends_a_signed_assertion_and_no_secret(
    client: AzureADClient, router: respx.MockRouter, cert: Cert, op: str, style: str
) -> None:
    """Each grant carries client_assertion_type and a PS256 JWT whose signature verifies with the
    certificate's public key, header {alg PS256, typ JWT, x5t#S256}, claims aud = the token URL,
    iss = sub = client id, a fresh jti, iat = nbf = now, exp 10 minutes on; no client_secret."""
    route = router.post(TOKEN_URLS[style]).mock(side_effect=ok)
    account = creds(style, assertion=signer(cert))
    await OPS[op](client, account)
    await OPS[op](client, account)
    jtis = set()
    for call in route.calls:
        form = form_of(call.request)
        assert "client_secret" not in form
        assert form["client_assertion_type"] == ASSERTION_TYPE
        token = form["client_assertion"]
        header = jwt.get_unverified_header(token)
        assert header == {"alg": "PS256", "typ": "JWT", "x5t#S256": x5t_s256(cert)}
        claims = jwt.decode(token, cert.cert.public_key(), algorithms=["PS256"], audience=TOKEN_URLS[style])  # type: ignore[arg-type]
        assert set(claims) == {"aud", "iss", "sub", "jti", "iat", "nbf", "exp"}
        assert claims["iss"] == claims["sub"] == CLIENT_ID
        assert claims["iat"] == claims["nbf"] == int(NOW)
        assert claims["exp"] - claims["iat"] == 600
        jtis.add(claims["jti"])
    assert len(jtis) == 2


async def test_a_signature_by_another_key_does_not_verify(
    client: AzureADClient, router: respx.MockRouter, cert: Cert
) -> None:
    """The check above can fail: another certificate's key does not verify the assertion."""
    route = router.post(TOKEN_URLS["v1"]).mock(side_effect=ok)
    await client.refresh(creds(assertion=signer(cert)), "0.rt")
    other = make_cert(1)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            form_of(route.calls.last.request)["client_assertion"],
            other.cert.public_key(),  # type: ignore[arg-type]
            algorithms=["PS256"],
            audience=TOKEN_URLS["v1"],
        )


def test_pkcs1_and_pkcs8_keys_parse_to_the_same_thumbprint(cert: Cert) -> None:
    """Both unencrypted key formats azure-identity takes are accepted; the thumbprint is x5t#S256."""
    now = datetime.now(UTC).replace(tzinfo=None)
    a, b = certificates.parse(cert.pem(), now=now), certificates.parse(cert.pem(pkcs1=True), now=now)
    assert a == b
    assert a.thumbprint == x5t_s256(cert)
    assert a.not_after == cert.cert.not_valid_after_utc.replace(tzinfo=None)


def _ec_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return pem + certificate(key).public_bytes(serialization.Encoding.PEM).decode()


def _encrypted_pem(cert: Cert) -> str:
    enc = serialization.BestAvailableEncryption(b"pw")
    key = cert.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc).decode()
    return key + cert.cert_pem


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda c: "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n" + c.cert_pem,
            "does not parse",
        ),
        (lambda c: c.cert_pem, "exactly one private key"),
        (lambda c: c.key_pem(), "holds no certificate"),
        (lambda c: c.key_pem() + make_cert(1).cert_pem, "does not match the certificate"),
        (
            lambda c: (
                c.key_pem() + Cert(c.key, certificate(c.key, days=-1, starts=timedelta(days=-30))).cert_pem
            ),
            "expired",
        ),
        (_encrypted_pem, "encrypted"),
        (lambda _c: _ec_pem(), "must be RSA"),
        (lambda c: c.key_pem() + c.key_pem() + c.cert_pem, "exactly one private key"),
    ],
)
def test_unusable_pems_are_refused_with_a_plain_reason(cert: Cert, make: Any, message: str) -> None:
    """A PEM that does not parse, lacks a part, whose key does not match, or has expired is refused
    with a reason that quotes none of it."""
    pem = make(cert)
    with pytest.raises(certificates.CertificateError) as info:
        certificates.parse(pem, now=datetime.now(UTC).replace(tzinfo=None))
    assert message in str(info.value)
    for line in pem.splitlines():
        if line and not line.startswith("-----"):
            assert line not in str(info.value)


async def test_an_unusable_certificate_is_refused_before_anything_is_sent(
    client: AzureADClient, router: respx.MockRouter
) -> None:
    """A stored certificate that no longer works (e.g. expired) is invalid_credentials; Azure is not asked."""
    # No route: any request would fail the test (respx refuses what is not mocked).
    with pytest.raises(errors.InvalidCredentials, match="expired"):
        await client.refresh(
            creds(assertion=Unusable("the certificate expired on ...", "certificate_invalid")), "0.rt"
        )
    assert not router.calls


def federated_token(exp: float, sub: str = "system:serviceaccount:broker:token-broker") -> str:
    claims = {"aud": "api://AzureADTokenExchange", "iss": "https://oidc.example", "sub": sub, "exp": int(exp)}
    return jwt.encode(claims, rsa_key(), algorithm="RS256")


def write(path: Path, text: str, *, mtime: float) -> None:
    path.write_text(text)
    os.utime(path, (mtime, mtime))


async def test_federated_assertion_is_the_token_file_reread_when_it_changes(
    client: AzureADClient, router: respx.MockRouter, tmp_path: Path
) -> None:
    """The token file's content is the assertion; unchanged it is not read again; rotated (new
    content, new mtime), the next request sends the new token."""
    route = router.post(TOKEN_URLS["v2"]).mock(side_effect=ok)
    path = tmp_path / "azure-identity-token"
    first, second = (
        federated_token(NOW + 3600),
        federated_token(NOW + 7200, sub="system:serviceaccount:broker:b"),
    )
    write(path, first, mtime=NOW - 100)
    reader = FederatedTokenFile(str(path))
    account = creds("v2", assertion=reader)
    await client.client_credentials(account)
    await client.client_credentials(account)
    assert reader.reads == 1
    write(path, second, mtime=NOW - 50)  # the kubelet swaps in a new token
    await client.client_credentials(account)
    sent = [form_of(c.request) for c in route.calls]
    assert [f["client_assertion"] for f in sent] == [first, first, second]
    assert all(f["client_assertion_type"] == ASSERTION_TYPE and "client_secret" not in f for f in sent)
    assert reader.reads == 2


@pytest.mark.parametrize("case", ["unset", "missing", "empty", "expired", "not_a_jwt"])
async def test_federated_file_problems_are_invalid_credentials_naming_the_setting(
    client: AzureADClient, router: respx.MockRouter, tmp_path: Path, case: str
) -> None:
    """A missing, unreadable, empty, malformed or expired token file is invalid_credentials whose
    message names BROKER_FEDERATED_TOKEN_FILE and quotes nothing of the file; Azure is not asked."""
    # No route: any request would fail the test (respx refuses what is not mocked).
    path = tmp_path / "token"
    content = {"empty": "", "expired": federated_token(NOW - 10), "not_a_jwt": "opaque-token-value-123"}.get(
        case
    )
    if content is not None:
        path.write_text(content)
    reader = FederatedTokenFile(None if case == "unset" else str(path))
    with pytest.raises(errors.InvalidCredentials) as info:
        await client.refresh(creds(assertion=reader), "0.rt")
    assert "BROKER_FEDERATED_TOKEN_FILE" in info.value.detail
    assert info.value.idp_code == "federated_token_file"
    if content:
        assert content not in info.value.detail
    assert not router.calls


async def test_a_refused_new_secret_falls_back_to_the_previous_one(
    client: AzureADClient, router: respx.MockRouter
) -> None:
    """Azure refusing the new secret as invalid_client (AADSTS7000215): the same grant is sent once
    more with the previous secret, and the grant says so."""
    answers = {NEW: bad_client(), OLD: ok(None)}  # type: ignore[arg-type]
    route = router.post(TOKEN_URLS["v1"]).mock(side_effect=lambda r: answers[form_of(r)["client_secret"]])
    grant = await client.refresh(creds(client_secret=NEW, previous_client_secret=OLD), "0.rt")
    assert grant.used_previous_secret
    assert [form_of(c.request)["client_secret"] for c in route.calls] == [NEW, OLD]
    assert (
        form_of(route.calls[0].request)["refresh_token"] == form_of(route.calls[1].request)["refresh_token"]
    )


async def test_a_working_new_secret_is_sent_alone(client: AzureADClient, router: respx.MockRouter) -> None:
    """The new secret accepted: one request, and the grant did not use the previous secret."""
    route = router.post(TOKEN_URLS["v1"]).mock(side_effect=ok)
    grant: TokenGrant = await client.client_credentials(creds(client_secret=NEW, previous_client_secret=OLD))
    assert not grant.used_previous_secret
    assert route.call_count == 1


@pytest.mark.parametrize("answer", ["both_refused", "invalid_grant", "no_previous"])
async def test_no_fallback_beyond_one_retry_for_invalid_client(
    client: AzureADClient, router: respx.MockRouter, answer: str
) -> None:
    """Only invalid_client with a previous secret kept is retried, once; the previous one refused
    too is the refusal; invalid_grant (the refresh token) is not retried."""
    if answer == "invalid_grant":
        body = {"error": "invalid_grant", "error_description": "AADSTS70008: expired", "error_codes": [70008]}
        route = router.post(TOKEN_URLS["v1"]).mock(return_value=httpx.Response(400, json=body))
        expected: type[errors.ActionRequired] = errors.NeedsAuthorization
    else:
        route = router.post(TOKEN_URLS["v1"]).mock(return_value=bad_client())
        expected = errors.InvalidCredentials
    previous = None if answer == "no_previous" else OLD
    with pytest.raises(expected):
        await client.refresh(creds(client_secret=NEW, previous_client_secret=previous), "0.rt")
    assert route.call_count == (2 if answer == "both_refused" else 1)
