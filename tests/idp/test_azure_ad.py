"""The Azure AD client: exact forms for every grant on v1 and v2, and every failure classified."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import httpx
import pytest
import respx

from service import errors
from service.idp.azure_ad import (
    AzureADClient,
    ClientCredentials,
    TokenGrant,
    endpoint_style,
    resource_of,
)
from service.idp.redaction import sanitize_description
from service.kit.outbound import OutboundPolicy

NOW = 1_700_000_000.0
TENANT = "7f3b7d01-a049-4dfd-9dbd-d394e711c3a0"
CLIENT_ID = "dc40e7c1-86fa-484e-a38b-bec0d31c945a"
SECRET = "uxjgDon7fWbis1ijuCDw+PifHooG4/BV2lVTUFRG="
REFRESH = "0.AAAA-old-refresh-token-value"
CODE = "OAQABAAIAAAD-one-time-code"
VERIFIER = "pkce-verifier-0123456789abcdefghijklmnopqrstuvwxyz-ABCDEFG"
REDIRECT = "https://broker.example.net/oauth/callback"
API_URL = "https://org.crm.dynamics.com/api/data/v9.2"
ORIGIN = "https://org.crm.dynamics.com"
LOGIN = f"https://login.microsoftonline.com/{TENANT}"
URLS = {
    "v1": (f"{LOGIN}/oauth2/token", f"{LOGIN}/oauth2/authorize"),
    "v2": (f"{LOGIN}/oauth2/v2.0/token", f"{LOGIN}/oauth2/v2.0/authorize"),
}
POLICY = OutboundPolicy(allowed_hosts=["login.microsoftonline.com", "*.crm.dynamics.com"])
SENT_SECRETS = (SECRET, REFRESH, CODE, VERIFIER)

Call = Callable[[AzureADClient, ClientCredentials], Awaitable[TokenGrant]]


def creds_for(style: str, *, secret: str | None = SECRET, token_url: str | None = None) -> ClientCredentials:
    token, authorize = URLS[style]
    return ClientCredentials(TENANT, CLIENT_ID, secret, token_url or token, authorize, API_URL)


def _target(style: str, *, offline: bool) -> dict[str, str]:
    if style == "v1":
        return {"resource": ORIGIN}
    return {"scope": f"{ORIGIN}/.default offline_access" if offline else f"{ORIGIN}/.default"}


OPS: dict[str, tuple[Call, Callable[[str], dict[str, str]]]] = {
    "refresh": (
        lambda c, cr: c.refresh(cr, REFRESH),
        lambda style: {
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "refresh_token": REFRESH,
            "client_secret": SECRET,
            **_target(style, offline=True),
        },
    ),
    "client_credentials": (
        lambda c, cr: c.client_credentials(cr),
        lambda style: {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            **_target(style, offline=False),
        },
    ),
    "redeem_code": (
        lambda c, cr: c.redeem_code(cr, code=CODE, redirect_uri=REDIRECT, code_verifier=VERIFIER),
        lambda style: {
            "grant_type": "authorization_code",
            "client_id": CLIENT_ID,
            "code": CODE,
            "redirect_uri": REDIRECT,
            "code_verifier": VERIFIER,
            "client_secret": SECRET,
            **_target(style, offline=True),
        },
    ),
}
OP_NAMES = list(OPS)
STYLES = ["v1", "v2"]


def success_body(style: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"token_type": "Bearer", "access_token": "new-access-token"}
    if style == "v1":
        body |= {"expires_in": "3599", "ext_expires_in": "3599", "expires_on": "1548192804"}
        body |= {"resource": ORIGIN, "scope": "user_impersonation"}
    else:
        body |= {"expires_in": 3599, "ext_expires_in": 3599, "scope": f"{ORIGIN}/user_impersonation"}
    return body | extra


def aad_error(error: str, code: int, text: str) -> httpx.Response:
    description = f"AADSTS{code}: {text}\r\nTrace ID: 0000\r\nCorrelation ID: 1111\r\nTimestamp: 2024-05-29"
    body = {"error": error, "error_description": description, "error_codes": [code], "trace_id": "0000"}
    return httpx.Response(400 if error != "invalid_client" else 401, json=body)


def form_of(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode(), keep_blank_values=True, strict_parsing=True)


@pytest.fixture
async def client() -> AsyncIterator[AzureADClient]:
    async with httpx.AsyncClient() as http:
        yield AzureADClient(http, POLICY, timeout=5.0, clock=lambda: NOW)


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=True) as mock:
        yield mock


async def run(op: str, client: AzureADClient, style: str, **kw: Any) -> TokenGrant:
    return await OPS[op][0](client, creds_for(style, **kw))


def assert_no_secret(exc: BaseException, secrets: tuple[str, ...] = SENT_SECRETS) -> None:
    texts = [str(exc), repr(exc), getattr(exc, "detail", ""), getattr(exc, "idp_message", "") or ""]
    texts += list(getattr(exc, "headers", {}).values())
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret leaked into {text!r}"


# --- success -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_success_sends_exact_form(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """Each grant posts exactly the expected form and returns the rotated refresh token."""
    route = router.post(URLS[style][0]).respond(200, json=success_body(style, refresh_token="rotated"))
    grant = await run(op, client, style)
    assert route.call_count == 1
    request = route.calls.last.request
    assert form_of(request) == {k: [v] for k, v in OPS[op][1](style).items()}
    assert request.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert grant == TokenGrant("new-access-token", NOW + 3599, "rotated", "Bearer")


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_omitted_refresh_token_is_none(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """A response without refresh_token (or an empty one) yields None: the caller keeps the old one."""
    router.post(URLS[style][0]).mock(
        side_effect=[
            httpx.Response(200, json=success_body(style)),
            httpx.Response(200, json=success_body(style, refresh_token="")),
        ]
    )
    assert (await run(op, client, style)).refresh_token is None
    assert (await run(op, client, style)).refresh_token is None


async def test_public_client_sends_no_secret(client: AzureADClient, router: respx.MockRouter) -> None:
    """Without a client secret or code verifier, neither field is sent."""
    route = router.post(URLS["v2"][0]).respond(200, json=success_body("v2"))
    creds = creds_for("v2", secret=None)
    await client.redeem_code(creds, code=CODE, redirect_uri=REDIRECT, code_verifier=None)
    await client.refresh(creds, REFRESH)
    first, second = (form_of(call.request) for call in route.calls)
    assert "client_secret" not in first
    assert "code_verifier" not in first
    assert "client_secret" not in second


async def test_client_credentials_needs_secret(client: AzureADClient, router: respx.MockRouter) -> None:
    """client_credentials without a secret is a configuration error raised before any request."""
    with pytest.raises(errors.InvalidCredentials, match="client_secret"):
        await client.client_credentials(creds_for("v1", secret=None))
    assert not router.calls


@pytest.mark.parametrize(
    ("body", "expires_at"),
    [
        ({"expires_on": "1700003000"}, 1_700_003_000.0),
        ({"expires_in": "garbage", "expires_on": "1700003000"}, 1_700_003_000.0),
        ({"expires_in": 3599.0}, NOW + 3599),
        ({"expires_in": " 60 "}, NOW + 60),
    ],
)
async def test_lifetime_forms(
    body: dict[str, Any], expires_at: float, client: AzureADClient, router: respx.MockRouter
) -> None:
    """expires_in as string or number, else v1's absolute expires_on, decides expires_at."""
    router.post(URLS["v1"][0]).respond(200, json={"access_token": "at", **body})
    grant = await client.refresh(creds_for("v1"), REFRESH)
    assert grant.expires_at == expires_at
    assert grant.token_type == "Bearer"


def test_reprs_hide_secrets() -> None:
    """Neither ClientCredentials nor TokenGrant shows a secret or token in its repr."""
    grant = TokenGrant("access-xyz", NOW, "refresh-xyz", "Bearer")
    assert "access-xyz" not in repr(grant)
    assert "refresh-xyz" not in repr(grant)
    assert SECRET not in repr(creds_for("v1"))
    assert CLIENT_ID in repr(creds_for("v1"))


# --- Azure's errors ------------------------------------------------------------------------------

NEEDS_AUTH_CODES = [
    (70008, "The provided authorization code or refresh token has expired due to inactivity."),
    (700082, "The refresh token has expired due to inactivity."),
    (50173, "The provided grant has expired due to it being revoked."),
    (70043, "The refresh token has expired or is invalid due to sign-in frequency checks."),
    (65001, "The user or administrator has not consented to use the application."),
    (54005, "OAuth2 Authorization code was already redeemed."),
]


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_invalid_grant_needs_authorization(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """invalid_grant becomes NeedsAuthorization with a plain, secret-free detail."""
    router.post(URLS[style][0]).mock(return_value=aad_error("invalid_grant", 70008, f"expired ({SECRET})"))
    with pytest.raises(errors.NeedsAuthorization) as info:
        await run(op, client, style)
    exc = info.value
    assert exc.idp_code == "invalid_grant"
    assert "AADSTS70008: expired" in exc.detail
    assert ("admin must grant" if op == "client_credentials" else "authorize the account again") in exc.detail
    assert exc.idp_message == "AADSTS70008: expired ([redacted])"
    assert_no_secret(exc)


@pytest.mark.parametrize(("code", "text"), NEEDS_AUTH_CODES)
async def test_aadsts_codes_named(
    code: int, text: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """Each well-known AADSTS code is named in the detail; Azure's words go to idp_message."""
    router.post(URLS["v1"][0]).mock(return_value=aad_error("invalid_grant", code, text))
    with pytest.raises(errors.NeedsAuthorization) as info:
        await client.refresh(creds_for("v1"), REFRESH)
    assert info.value.detail.startswith("Azure AD no longer accepts this account's refresh token (AADSTS")
    assert f"AADSTS{code}:" in info.value.detail
    assert info.value.idp_message == f"AADSTS{code}: {text}"


@pytest.mark.parametrize("error", ["interaction_required", "consent_required", "login_required"])
async def test_interaction_errors_need_authorization(
    error: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """interaction_required, consent_required and login_required act like invalid_grant."""
    router.post(URLS["v2"][0]).mock(return_value=aad_error(error, 50076, "MFA needed."))
    with pytest.raises(errors.NeedsAuthorization) as info:
        await client.refresh(creds_for("v2"), REFRESH)
    assert info.value.idp_code == error


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_invalid_client_is_invalid_credentials(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """invalid_client (a bad or expired secret) becomes InvalidCredentials naming client_secret."""
    router.post(URLS[style][0]).mock(return_value=aad_error("invalid_client", 7000222, "Secret expired."))
    with pytest.raises(errors.InvalidCredentials) as info:
        await run(op, client, style)
    assert info.value.idp_code == "invalid_client"
    assert "fix client_secret" in info.value.detail
    assert "AADSTS7000222: the client secret expired" in info.value.detail
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    ("error", "code", "field"),
    [
        ("unauthorized_client", 700016, "client_secret"),
        ("invalid_resource", 500011, "api_url"),
        ("invalid_scope", 70011, "api_url"),
        ("unsupported_grant_type", 70003, "token_url"),
        ("invalid_request", 90002, "tenant_id"),
    ],
)
async def test_configuration_errors_name_the_field(
    error: str, code: int, field: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """Other OAuth errors are InvalidCredentials whose detail names the field likely wrong."""
    router.post(URLS["v1"][0]).mock(return_value=aad_error(error, code, "Something is off."))
    with pytest.raises(errors.InvalidCredentials) as info:
        await client.refresh(creds_for("v1"), REFRESH)
    assert field in info.value.detail
    assert info.value.idp_code == error


# --- transient failures --------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_throttled_honours_retry_after(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """429 with Retry-After: 7 becomes UpstreamUnavailable(throttled, retry_after=7)."""
    router.post(URLS[style][0]).respond(429, headers={"Retry-After": "7"})
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await run(op, client, style)
    assert (info.value.reason, info.value.retry_after) == ("throttled", 7.0)
    assert info.value.headers["Retry-After"] == "7"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 5.0), ("garbage", 5.0), ("100000", 300.0), (formatdate(NOW + 42, usegmt=True), 42.0)],
)
async def test_retry_after_forms(
    header: str | None, expected: float, client: AzureADClient, router: respx.MockRouter
) -> None:
    """Retry-After may be absent (5 s), garbage (5 s), huge (capped at 300 s) or an HTTP-date."""
    headers = {"Retry-After": header} if header else {}
    router.post(URLS["v1"][0]).respond(429, headers=headers)
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await client.refresh(creds_for("v1"), REFRESH)
    assert info.value.retry_after == expected


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_server_error(
    op: str, style: str, status: int, client: AzureADClient, router: respx.MockRouter
) -> None:
    """5xx becomes UpstreamUnavailable(server_error), retry_after from the header or 1 s."""
    headers = {"Retry-After": "3"} if status == 503 else {}
    router.post(URLS[style][0]).respond(status, headers=headers, text="<html>oops</html>")
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await run(op, client, style)
    assert info.value.reason == "server_error"
    assert info.value.retry_after == (3.0 if status == 503 else 1.0)


@pytest.mark.parametrize(
    ("side_effect", "reason"),
    [
        (httpx.ConnectTimeout("timed out"), "timeout"),
        (httpx.ReadTimeout("timed out"), "timeout"),
        (httpx.ConnectError("connection refused"), "network"),
        (httpx.RemoteProtocolError("peer closed"), "network"),
        (httpx.ReadError("connection reset"), "network"),
        (httpx.WriteError("broken pipe"), "network"),
    ],
)
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_transport_errors(
    op: str, style: str, side_effect: Exception, reason: str, client: AzureADClient
) -> None:
    """Timeouts become reason 'timeout', other transport errors 'network', the form never shown.

    A dropped connection (the server closed it under the request) is sent once more, never twice.
    """
    with respx.mock(assert_all_called=True) as router:
        route = router.post(URLS[style][0]).mock(side_effect=side_effect)
        with pytest.raises(errors.UpstreamUnavailable) as info:
            await run(op, client, style)
    assert info.value.reason == reason
    assert_no_secret(info.value)
    dropped = isinstance(side_effect, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)
    assert route.call_count == (2 if dropped else 1)


class DroppingServer:
    """A real HTTP/1.1 token endpoint that answers keep-alive, then closes a connection when the next
    request arrives on it without answering: what a server whose idle timer fired does to the client
    that reused the connection at that moment. ``drop(connection, answered)`` says when: by the
    connection's number and how many requests it has answered."""

    def __init__(self, drop: Callable[[int, int], bool]) -> None:
        self.drop = drop
        self.connections = 0
        self.requests: list[tuple[int, dict[str, list[str]]]] = []
        self.server: asyncio.Server | None = None

    @property
    def token_url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/{TENANT}/oauth2/token"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, served = self.connections, 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
                body = await reader.readexactly(length)
                self.requests.append((number, parse_qs(body.decode())))
                if self.drop(number, served):
                    return  # closed without a byte of answer
                served += 1
                payload = json.dumps(success_body("v1", access_token=f"at-{len(self.requests)}")).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> DroppingServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_grant_sent_again_when_kept_alive_connection_is_dropped() -> None:
    """The server drops the reused connection: the same form goes out once more, on a new one."""
    policy = OutboundPolicy(allowed_hosts=["127.0.0.1:*", "*.crm.dynamics.com"], allow_http=True)
    drop_reused_first = DroppingServer(drop=lambda n, answered: n == 1 and answered > 0)
    async with drop_reused_first as server, httpx.AsyncClient() as http:
        azure = AzureADClient(http, policy, timeout=5.0, clock=lambda: NOW)
        creds = creds_for("v1", token_url=server.token_url)
        first = await azure.refresh(creds, REFRESH)
        second = await azure.refresh(creds, REFRESH)
    assert (first.access_token, second.access_token) == ("at-1", "at-3")
    assert [number for number, _ in server.requests] == [1, 1, 2]
    assert server.requests[1][1] == server.requests[2][1]  # the same grant, not a different one


async def test_grant_sent_at_most_twice_when_every_connection_drops() -> None:
    """A server that drops every request: two sends on two connections, then 'network'; no loop."""
    policy = OutboundPolicy(allowed_hosts=["127.0.0.1:*", "*.crm.dynamics.com"], allow_http=True)
    async with DroppingServer(drop=lambda n, answered: True) as server, httpx.AsyncClient() as http:
        azure = AzureADClient(http, policy, timeout=5.0, clock=lambda: NOW)
        with pytest.raises(errors.UpstreamUnavailable) as info:
            await azure.refresh(creds_for("v1", token_url=server.token_url), REFRESH)
    assert info.value.reason == "network"
    assert [number for number, _ in server.requests] == [1, 2]
    assert_no_secret(info.value)


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>Sign in</html>"),
        httpx.Response(200, json=["access_token"]),
        httpx.Response(200, json={"token_type": "Bearer", "expires_in": "3599"}),
        httpx.Response(200, json={"access_token": "", "expires_in": 3599}),
        httpx.Response(200, json={"access_token": 12, "expires_in": 3599}),
        httpx.Response(200, json={"access_token": "at", "expires_in": "soon"}),
        httpx.Response(200, json={"access_token": "at", "expires_in": True}),
        httpx.Response(200, json={"access_token": "at", "expires_in": 3599, "refresh_token": 5}),
        httpx.Response(200, content=b"\xff\xfe\x00garbage"),
        httpx.Response(404, text="<html>Not found</html>"),
        httpx.Response(400, json={"error": ""}),
        httpx.Response(204),
    ],
)
@pytest.mark.parametrize("style", STYLES)
async def test_unparseable_is_bad_response(
    response: httpx.Response, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """Non-JSON, wrongly typed or incomplete answers become UpstreamUnavailable(bad_response)."""
    router.post(URLS[style][0]).mock(return_value=response)
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await client.refresh(creds_for(style), REFRESH)
    assert info.value.reason == "bad_response"


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_redirect_is_not_followed(
    op: str, style: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """A 302 becomes UpstreamUnavailable(redirect) and its Location is never requested."""
    location = f"{LOGIN}/elsewhere"
    route = router.post(URLS[style][0]).respond(302, headers={"Location": location})
    with pytest.raises(errors.UpstreamUnavailable) as info:
        await run(op, client, style)
    assert info.value.reason == "redirect"
    assert route.call_count == 1
    assert len(router.calls) == 1


@pytest.mark.parametrize(
    "token_url",
    [
        f"https://evil.example.com/{TENANT}/oauth2/token",
        f"http://login.microsoftonline.com/{TENANT}/oauth2/token",
        f"https://user:pw@login.microsoftonline.com/{TENANT}/oauth2/token",
    ],
)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_disallowed_token_url_raises_before_request(
    op: str, token_url: str, client: AzureADClient, router: respx.MockRouter
) -> None:
    """A token URL the policy refuses is InvalidCredentials naming token_url; nothing is sent."""
    with pytest.raises(errors.InvalidCredentials, match="token_url") as info:
        await run(op, client, "v1", token_url=token_url)
    assert not router.calls
    assert_no_secret(info.value)


ERROR_CASES: list[httpx.Response | Exception] = [
    aad_error("invalid_grant", 70008, f"Token {REFRESH} expired."),
    aad_error("invalid_grant", 54005, f"Code {CODE} was already redeemed; verifier {VERIFIER}."),
    aad_error("invalid_client", 7000215, f"Invalid client secret provided: '{SECRET}'."),
    aad_error("invalid_request", 900144, f"Body had client_secret={quote_plus(SECRET)}&code={quote(CODE)}"),
    aad_error("invalid_grant", 70000, "Echo " + "x" * 80 + " of something token-like."),
    httpx.Response(429, json={"error": "throttled", "error_description": f"slow down {SECRET}"}),
    httpx.Response(503, json={"error": "temporarily_unavailable", "error_description": REFRESH}),
    httpx.Response(200, text=f"<html>{SECRET} {REFRESH} {CODE}</html>"),
    httpx.Response(400, text=f"{SECRET} {REFRESH} {CODE}"),
    httpx.Response(302, headers={"Location": f"https://x/?code={CODE}"}),
    httpx.ConnectTimeout("timed out"),
    httpx.ConnectError("refused"),
    httpx.DecodingError("bad gzip"),
]


@pytest.mark.parametrize("case", range(len(ERROR_CASES)))
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("op", OP_NAMES)
async def test_no_error_path_leaks_secrets(
    op: str, style: str, case: int, client: AzureADClient, router: respx.MockRouter
) -> None:
    """No error's message, detail, idp_message or headers carries a secret value that was sent."""
    outcome = ERROR_CASES[case]
    route = router.post(URLS[style][0])
    if isinstance(outcome, Exception):
        route.mock(side_effect=outcome)
    else:
        route.mock(return_value=outcome)
    with pytest.raises(errors.BrokerError) as info:
        await run(op, client, style)
    sent = OPS[op][1](style)
    secrets = tuple(sent[k] for k in ("client_secret", "refresh_token", "code", "code_verifier") if k in sent)
    assert len(secrets) >= 1
    assert_no_secret(info.value, secrets)


def test_sanitize_description() -> None:
    """Descriptions keep the first line, lose the diagnostics, redact what was sent and are bounded."""
    text = f"AADSTS70008: expired {SECRET}. Trace ID: abc Correlation ID: def\r\nTimestamp: 2024"
    assert sanitize_description(text, [SECRET]) == "AADSTS70008: expired [redacted]."
    assert len(sanitize_description("word " * 200)) <= 300
    assert sanitize_description("", [SECRET]) == ""


# --- the authorize URL and helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("style", "target"),
    [("v1", {"resource": [ORIGIN]}), ("v2", {"scope": [f"{ORIGIN}/.default offline_access"]})],
)
async def test_authorization_url(style: str, target: dict[str, list[str]], client: AzureADClient) -> None:
    """The authorize URL carries exactly the PKCE code-flow parameters and never the secret."""
    url = client.authorization_url(creds_for(style), redirect_uri=REDIRECT, state="st", code_challenge="cc")
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == URLS[style][1]
    assert parse_qs(parts.query, strict_parsing=True) == {
        "response_type": ["code"],
        "client_id": [CLIENT_ID],
        "redirect_uri": [REDIRECT],
        "state": ["st"],
        "code_challenge": ["cc"],
        "code_challenge_method": ["S256"],
        **target,
    }
    assert SECRET not in url
    assert "client_secret" not in url


async def test_authorization_url_drops_seed_query(client: AzureADClient) -> None:
    """A pasted seed-style authorize URL keeps foreign params but loses client_secret and ours."""
    base = URLS["v1"][1]
    pasted = f"{base}?grant_type=client_credentials&client_secret=leak&resource=x&domain_hint=contoso"
    creds = ClientCredentials(TENANT, CLIENT_ID, SECRET, URLS["v1"][0], pasted, API_URL)
    url = client.authorization_url(creds, redirect_uri=REDIRECT, state="st", code_challenge="cc")
    query = parse_qs(urlsplit(url).query)
    assert query["domain_hint"] == ["contoso"]
    assert query["resource"] == [ORIGIN]
    assert "client_secret" not in query
    assert "grant_type" not in query
    assert "leak" not in url


async def test_authorization_url_checked_by_policy(client: AzureADClient) -> None:
    """An authorize URL the policy refuses raises InvalidCredentials naming authorization_url."""
    creds = ClientCredentials(
        TENANT, CLIENT_ID, SECRET, URLS["v1"][0], "https://evil.test/authorize", API_URL
    )
    with pytest.raises(errors.InvalidCredentials, match="authorization_url"):
        client.authorization_url(creds, redirect_uri=REDIRECT, state="st", code_challenge="cc")


async def test_bad_api_url_is_invalid_credentials(client: AzureADClient, router: respx.MockRouter) -> None:
    """An api_url without an origin is InvalidCredentials naming api_url; nothing is sent."""
    creds = ClientCredentials(TENANT, CLIENT_ID, SECRET, URLS["v1"][0], URLS["v1"][1], "not a url")
    with pytest.raises(errors.InvalidCredentials, match="api_url"):
        await client.refresh(creds, REFRESH)
    assert not router.calls


@pytest.mark.parametrize(
    ("url", "style"),
    [
        (URLS["v1"][0], "v1"),
        (URLS["v2"][0], "v2"),
        (URLS["v2"][1], "v2"),
        ("https://login.microsoftonline.com/common/OAuth2/V2.0/token", "v2"),
        ("https://login.microsoftonline.com/t/oauth2/token?x=/oauth2/v2.0/", "v1"),
    ],
)
def test_endpoint_style(url: str, style: str) -> None:
    """The path, not the query, decides v1 or v2."""
    assert endpoint_style(url) == style


@pytest.mark.parametrize(
    ("api_url", "origin"),
    [
        (API_URL, ORIGIN),
        ("https://ORG.crm.dynamics.com:443/api/data/v9.0/", ORIGIN),
        ("https://org.crm.dynamics.com:8443/api", "https://org.crm.dynamics.com:8443"),
        ("http://localhost:80/api", "http://localhost"),
        ("https://[::1]:9443/api", "https://[::1]:9443"),
    ],
)
def test_resource_of(api_url: str, origin: str) -> None:
    """The resource is the API URL's origin, with the port only when it is not the default."""
    assert resource_of(api_url) == origin


@pytest.mark.parametrize("api_url", ["", "org.crm.dynamics.com/api", "ftp://org/api"])
def test_resource_of_rejects_non_urls(api_url: str) -> None:
    """A value without an http(s) origin is a ValueError."""
    with pytest.raises(ValueError, match="URL"):
        resource_of(api_url)


class _Unchecked(OutboundPolicy):
    """Lets every URL through, as if the policy had missed one httpx cannot send."""

    def check(self, url: str) -> str:
        return url


@pytest.mark.parametrize("token_url", ["https://xn--.crm.dynamics.com/oauth2/token", "https://a\u200db.x/t"])
@pytest.mark.parametrize("op", OP_NAMES)
async def test_a_token_url_httpx_cannot_send_is_invalid_credentials(
    op: str, token_url: str, router: respx.MockRouter
) -> None:
    """Defence in depth: IDNAError/InvalidURL at send time is InvalidCredentials, not a foreign error."""
    async with httpx.AsyncClient() as http:
        client = AzureADClient(http, _Unchecked(allowed_hosts=[]), timeout=5.0, clock=lambda: NOW)
        with pytest.raises(errors.InvalidCredentials, match="token_url") as info:
            await run(op, client, "v1", token_url=token_url)
    assert not router.calls
    assert_no_secret(info.value)
