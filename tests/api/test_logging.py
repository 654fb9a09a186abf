"""Logs are JSON lines without secrets, and token cache hits stay out of the access log.

Known secret values are pushed through every path that handles one (accounts, secret changes,
refreshes good and bad, Azure errors that echo what was sent, both authorization flows, caller
keys, invalid input, bad keys, webhooks), with the root logger at DEBUG behind the service's own
JSON formatter; then the captured log output, every response and ``/metrics`` are searched.
The logging set-up is ``logconfig.configure("DEBUG")`` (what ``token-broker serve`` does, at its
most verbose) with the handler swapped for one that keeps the lines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, quote_plus

import httpx
import pytest
import respx

from service import logconfig, migrate
from service.logconfig import JsonFormatter
from service.settings import Settings
from tests.conftest import (
    ADMIN_KEY,
    API_URL,
    CLIENT_KEY,
    TOKEN_URL_V1,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

CLIENT_SECRET_1 = "cs1-Secret-Value~aaaa.1111"
CLIENT_SECRET_2 = "cs2-Secret-Value~bbbb.2222"
REFRESH_1 = "0.AR-refresh-secret-one-1111"
REFRESH_2 = "0.AR-refresh-secret-two-2222"  # what Azure rotates REFRESH_1 into
REFRESH_BAD = "0.AR-refresh-secret-bad-3333"  # Azure refuses it and echoes it back
REFRESH_CODE = "0.AR-refresh-secret-from-code-4444"
REFRESH_PASTED = "0.AR-refresh-secret-pasted-5555"
ACCESS_1 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-secret-one.sig1"
ACCESS_2 = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-secret-two.sig2"
ACCESS_CODE = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-secret-code.sig3"
ACCESS_PASTED = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.access-secret-paste.sig4"
CODE = "0.AQ8A-authorization-code-secret-6666"
CODE_PASTED = "0.AQ8A-pasted-code-secret-7777"
CODE_REFUSED = "0.AQ8A-refused-code-secret-8888"
INVALID_SECRET = "cs-invalid-input-secret-9999"
BAD_KEY = "tbk_BadKeyLookingValue0123456789abcdefXYZ"
HOOK = "https://hooks.example.internal/broker"
HOOK_SECRET = "whsec-logging-secret-0000"
ACCESS_TOKENS = (ACCESS_1, ACCESS_2, ACCESS_CODE, ACCESS_PASTED)
SECRETS = (
    CLIENT_SECRET_1,
    CLIENT_SECRET_2,
    REFRESH_1,
    REFRESH_2,
    REFRESH_BAD,
    REFRESH_CODE,
    REFRESH_PASTED,
    *ACCESS_TOKENS,
    CODE,
    CODE_PASTED,
    CODE_REFUSED,
    INVALID_SECRET,
    BAD_KEY,
    ADMIN_KEY,
    CLIENT_KEY,
    HOOK_SECRET,
)


class Capture(logging.Handler):
    """Keeps every record and the line the service's formatter makes of it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))

    def access_lines(self) -> int:
        return sum(1 for r in self.records if r.name == "service.access")


@pytest.fixture
def captured() -> Iterator[Capture]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    quieted = {
        name: logging.getLogger(name).level for name in ("httpx", "httpcore", "uvicorn.access", "alembic")
    }
    logconfig.configure("DEBUG")
    capture = Capture()
    root.handlers[:] = [capture, *saved[0]]  # pytest's own handlers stay, for its reports
    try:
        yield capture
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in quieted.items():
            logging.getLogger(name).setLevel(old)


@dataclass
class Seen:
    """Every response the test client got: (method, path, status, headers + body)."""

    responses: list[tuple[str, str, int, str]] = field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        request = response.request
        self.responses.append(
            (request.method, request.url.path, response.status_code, headers + "\n" + response.text)
        )


def forms(secret: str) -> set[str]:
    """A secret as it could appear: as is, and URL-encoded both ways."""
    return {secret, quote(secret, safe=""), quote_plus(secret)}


def leaked(text: str, allowed: Collection[str] = ()) -> list[str]:
    return [s for s in SECRETS if s not in allowed and any(f in text for f in forms(s))]


@pytest.fixture
async def hooked_settings(database_url: str, tmp_path: Path) -> Settings:
    await migrate.upgrade(database_url)
    return make_settings(
        database_url,
        tmp_path,
        webhook_url=HOOK,
        webhook_secret=HOOK_SECRET,
        webhook_poll_seconds=0.05,
        webhook_backoff_base_seconds=0.0,
    )


def azure_token_endpoint(request: httpx.Request, verifiers: list[str]) -> httpx.Response:
    """Azure AD: good and bad refresh tokens, good and refused codes; errors echo what was sent."""
    sent = dict(parse_qsl(request.content.decode()))
    grant = sent["grant_type"]
    if grant == "refresh_token":
        answers = {REFRESH_1: (ACCESS_1, REFRESH_2), REFRESH_2: (ACCESS_2, None)}
        if sent["refresh_token"] in answers:
            access, refresh = answers[sent["refresh_token"]]
            return httpx.Response(200, json=v1_token(access, refresh))
        return httpx.Response(
            400,
            json={
                "error": "invalid_grant",
                "error_description": (
                    f"AADSTS70008: The refresh token {sent['refresh_token']} has expired. Client secret "
                    f"{quote_plus(sent.get('client_secret', ''))} was sent.\r\nTrace ID: 1\r\nTimestamp: x"
                ),
                "error_codes": [70008],
            },
        )
    if sent.get("code_verifier"):
        verifiers.append(sent["code_verifier"])
    if sent["code"] == CODE:
        return httpx.Response(200, json=v1_token(ACCESS_CODE, REFRESH_CODE))
    if sent["code"] == CODE_PASTED:
        return httpx.Response(200, json=v1_token(ACCESS_PASTED, REFRESH_PASTED))
    return httpx.Response(
        400,
        json={
            "error": "invalid_grant",
            "error_description": f"AADSTS54005: OAuth2 Authorization code {sent['code']} was already "
            f"redeemed (verifier {sent.get('code_verifier')}).",
            "error_codes": [54005],
        },
    )


async def test_no_secret_in_logs_responses_metrics_or_webhooks(
    hooked_settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter, captured: Capture
) -> None:
    """Known secrets through every path: none in a log line, a response (but its own) or /metrics."""
    verifiers: list[str] = []
    azure.post(TOKEN_URL_V1).mock(side_effect=lambda r: azure_token_endpoint(r, verifiers))
    hook = azure.post(HOOK).respond(200)
    whoami = azure.get(f"{API_URL}/WhoAmI").respond(401, text=f"token {ACCESS_1} rejected")
    seen = Seen()
    async with run_app(hooked_settings) as running:
        http = running.client
        http.event_hooks["response"].append(seen)
        # An account, its secret changed, a refresh that rotates the refresh token, a WhoAmI
        # that echoes the token, and a refresh forced by min_ttl.
        r = await http.post(
            "/accounts",
            json=account_body(client_secret=CLIENT_SECRET_1, refresh_token=REFRESH_1),
            headers=admin(),
        )
        assert r.status_code == 201, r.text
        good = r.json()["id"]
        r = await http.patch(f"/accounts/{good}", json={"client_secret": CLIENT_SECRET_2}, headers=admin())
        assert r.status_code == 200, r.text
        assert (await http.get(f"/accounts/{good}/token", headers=client())).json()[
            "access_token"
        ] == ACCESS_1
        assert (await http.post(f"/accounts/{good}/test", headers=admin())).json()["ok"] is False
        assert whoami.called
        r = await http.get(f"/accounts/{good}/token", params={"min_ttl": 3600}, headers=client())
        assert r.json()["access_token"] == ACCESS_2
        # A refresh Azure refuses, echoing the refresh token and the client secret.
        r = await http.post("/accounts", json=account_body(refresh_token=REFRESH_BAD), headers=admin())
        bad = r.json()["id"]
        r = await http.get(f"/accounts/{bad}/token", headers=client())
        assert r.json()["code"] == "needs_authorization"
        assert (
            "[redacted]"
            in (await http.get(f"/accounts/{bad}", headers=admin())).json()["last_error"]["message"]
        )
        await http.get(f"/accounts/{bad}/events", headers=admin())
        # The hosted flow, the pasted flow, and a refused code.
        r = await http.post("/accounts", json=account_body(refresh_token=None), headers=admin())
        fresh = r.json()["id"]
        states: list[str] = []
        started = (await http.post(f"/accounts/{fresh}/authorize", headers=admin())).json()
        states.append(started["state"])
        r = await http.get("/oauth/callback", params={"code": CODE, "state": started["state"]})
        assert r.status_code == 200, r.text
        started = (
            await http.post(
                f"/accounts/{fresh}/authorize", json={"redirect_uri": "http://localhost"}, headers=admin()
            )
        ).json()
        states.append(started["state"])
        pasted = f"http://localhost/?code={CODE_PASTED}&state={started['state']}&session_state=s"
        r = await http.post(f"/accounts/{fresh}/authorization-code", json={"code": pasted}, headers=admin())
        assert r.status_code == 200, r.text
        started = (await http.post(f"/accounts/{fresh}/authorize", headers=admin())).json()
        states.append(started["state"])
        r = await http.get("/oauth/callback", params={"code": CODE_REFUSED, "state": started["state"]})
        assert r.status_code == 409
        r = await http.post(
            f"/accounts/{fresh}/authorization-code", json={"code": CODE_REFUSED}, headers=admin()
        )
        assert r.status_code == 409
        assert len(verifiers) >= 3
        # A caller key, used once; invalid input carrying a secret; bad keys.
        r = await http.post(
            "/keys", json={"name": "engine", "role": "client", "accounts": [good]}, headers=admin()
        )
        new_key = r.json()["key"]
        r = await http.get(f"/accounts/{good}/token", headers={"Authorization": f"Bearer {new_key}"})
        assert r.status_code == 200
        await http.get("/keys", headers=admin())
        for body in (
            account_body(client_secret=INVALID_SECRET + "x" * 120),
            account_body(client_secret=INVALID_SECRET + "\u00e9"),
            account_body(refresh_token=INVALID_SECRET + "\x01"),
            {**account_body(), "password": INVALID_SECRET},
        ):
            r = await http.post("/accounts", json=body, headers=admin())
            assert r.status_code == 422, r.text
        r = await http.patch(f"/accounts/{good}", json={"client_secret": [INVALID_SECRET]}, headers=admin())
        assert r.status_code == 422
        r = await http.post(
            "/accounts",
            content=f'{{"client_secret": "{INVALID_SECRET}"',
            headers={**admin(), "Content-Type": "application/json"},
        )
        assert r.status_code == 422
        for path in (f"/accounts/{good}/token", "/accounts", "/keys"):
            for header in (f"Bearer {BAD_KEY}", BAD_KEY, f"Basic {BAD_KEY}"):
                r = await http.get(path, headers={"Authorization": header})
                assert r.status_code == 401, (path, header, r.status_code)
        # The notifications about `bad` (needs_authorization) and `fresh` (ready) have gone out.
        async with asyncio.timeout(10):
            while hook.call_count < 2:
                await asyncio.sleep(0.02)
        metrics = (await http.get("/metrics")).text

    secrets_now = {*verifiers, *states, new_key}
    # Log lines: JSON objects with ts, level and event, and no secret at all.
    assert captured.lines
    for line in captured.lines:
        doc = json.loads(line)
        assert isinstance(doc, dict)
        assert {"ts", "level", "event"} <= doc.keys(), line
    text = "\n".join(captured.lines)
    assert leaked(text) == []
    assert not [v for v in secrets_now if v in text]
    # Responses: only the token responses carry access tokens, only POST /keys the new key.
    for method, path, status, content in seen.responses:
        allowed = set(ACCESS_TOKENS) if path.endswith("/token") and status == 200 else set()
        assert leaked(content, allowed) == [], (method, path, status)
        assert not [v for v in verifiers if v in content], (method, path)
        if new_key in content:
            assert (method, path, status) == ("POST", "/keys", 201)
    # Metrics and webhooks.
    assert leaked(metrics) == []
    assert new_key not in metrics
    for call in hook.calls:
        wire = call.request.content.decode() + str(call.request.headers)
        assert leaked(wire) == []


async def test_cache_hits_write_no_access_log_but_a_miss_does(
    running: Any, azure: respx.MockRouter, captured: Capture
) -> None:
    """100 token cache hits add no access-log line; a miss, an error and other requests each add one."""
    azure.post(TOKEN_URL_V1).respond(200, json=v1_token("at-hit-1", "rt-hit-2"))
    r = await running.client.post("/accounts", json=account_body(), headers=admin())
    account_id = r.json()["id"]
    path = f"/accounts/{account_id}/token"
    assert (await running.client.get(path, headers=client())).status_code == 200
    before = captured.access_lines()
    for _ in range(100):
        assert (await running.client.get(path, headers=client())).status_code == 200
    assert captured.access_lines() == before
    hits = running.ctx.metrics.registry.get_sample_value("broker_token_requests_total", {"outcome": "hit"})
    assert hits >= 100
    r = await running.client.get(path, params={"min_ttl": 3600}, headers=client())  # cannot be a hit
    assert r.status_code == 200
    assert captured.access_lines() == before + 1
    await running.client.get("/accounts/missing/token", headers=client())
    await running.client.get("/healthz")
    assert captured.access_lines() == before + 3
    last = json.loads(next(line for line in reversed(captured.lines) if '"service.access"' in line))
    assert {"ts", "level", "event", "request_id", "method", "path", "status", "duration_ms"} <= last.keys()
    assert (last["path"], last["status"], last["event"]) == ("/healthz", 200, "request")


def test_formatter_keeps_whitelisted_fields_and_drops_the_rest() -> None:
    """An extra key off the whitelist is dropped; an exception shows its type, not its message."""
    record = logging.LogRecord("service.x", logging.ERROR, __file__, 1, "refresh failed", None, None)
    record.account_id = "acct-1"
    record.refresh_token = REFRESH_1
    try:
        raise ValueError(f"driver said: {CLIENT_SECRET_1}")
    except ValueError:
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["account_id"] == "acct-1"
    assert doc["error_type"] == "ValueError"
    assert (doc["level"], doc["event"], doc["logger"]) == ("error", "refresh failed", "service.x")
    assert REFRESH_1 not in json.dumps(doc)
    assert CLIENT_SECRET_1 not in json.dumps(doc)


async def test_no_key_pem_assertion_or_token_file_in_logs_responses_events_metrics_or_webhooks(
    database_url: str,
    tmp_path: Path,
    run_app: Callable[[Settings], Any],
    azure: respx.MockRouter,
    captured: Capture,
) -> None:
    """Certificate and federated accounts, unusable PEMs, Azure refusing and echoing an assertion,
    a replaced secret's fallback and expiry notices: no private key, certificate PEM, assertion,
    token file content or secret in a log line, a response, an event, /metrics or a webhook."""
    import jwt

    from tests.certs import make_cert, rsa_key

    cert = make_cert()
    token_file = tmp_path / "azure-identity-token"
    federated = jwt.encode(
        {"aud": "api://AzureADTokenExchange", "sub": "system:serviceaccount:b:b", "exp": 4_000_000_000},
        rsa_key(),
        algorithm="RS256",
    )
    token_file.write_text(federated)
    await migrate.upgrade(database_url)
    settings = make_settings(
        database_url,
        tmp_path,
        webhook_url=HOOK,
        webhook_secret=HOOK_SECRET,
        webhook_poll_seconds=0.05,
        webhook_backoff_base_seconds=0.0,
        federated_token_file=str(token_file),
    )
    assertions: list[str] = []

    def token_endpoint(request: httpx.Request) -> httpx.Response:
        sent = dict(parse_qsl(request.content.decode()))
        if "client_assertion" in sent:
            assertions.append(sent["client_assertion"])
            if sent["client_assertion"] != federated:  # the certificate is unknown: Azure echoes it
                return httpx.Response(
                    401,
                    json={
                        "error": "invalid_client",
                        "error_description": f"AADSTS700027: assertion {sent['client_assertion']} refused",
                        "error_codes": [700027],
                    },
                )
            return httpx.Response(200, json=v1_token(ACCESS_1, None))
        if sent.get("client_secret") == CLIENT_SECRET_2:  # the new secret is not accepted yet
            return httpx.Response(
                401,
                json={
                    "error": "invalid_client",
                    "error_description": f"AADSTS7000215: Invalid client secret {CLIENT_SECRET_2}",
                    "error_codes": [7000215],
                },
            )
        return httpx.Response(200, json=v1_token(ACCESS_2, None))

    azure.post(TOKEN_URL_V1).mock(side_effect=token_endpoint)
    hook = azure.post(HOOK).respond(200)
    seen = Seen()
    cc = {"grant_type": "client_credentials", "refresh_token": None, "client_secret": None}
    async with run_app(settings) as running:
        http = running.client
        http.event_hooks["response"].append(seen)
        r = await http.post(
            "/accounts",
            json=account_body(**cc, credential_type="certificate", certificate=cert.pem()),
            headers=admin(),
        )
        assert r.status_code == 201, r.text
        with_cert = r.json()["id"]
        assert (await http.get(f"/accounts/{with_cert}/token", headers=client())).status_code == 409
        for pem in (cert.key_pem() + make_cert(1).cert_pem, cert.key_pem(), cert.pem() + "x" * 40_000):
            body = account_body(**cc, credential_type="certificate", certificate=pem)
            assert (await http.post("/accounts", json=body, headers=admin())).status_code == 422
        r = await http.patch(
            f"/accounts/{with_cert}", json={"certificate": cert.pem(pkcs1=True)}, headers=admin()
        )
        assert r.status_code == 200, r.text
        r = await http.post(
            "/accounts", json=account_body(**cc, credential_type="federated"), headers=admin()
        )
        fed = r.json()["id"]
        assert (await http.get(f"/accounts/{fed}/token", headers=client())).status_code == 200
        r = await http.post(
            "/accounts",
            json=account_body(
                **{**cc, "client_secret": CLIENT_SECRET_1}, client_secret_expires_at="2020-01-01T00:00:00Z"
            ),
            headers=admin(),
        )
        rotated = r.json()["id"]
        await http.patch(f"/accounts/{rotated}", json={"client_secret": CLIENT_SECRET_2}, headers=admin())
        assert (await http.get(f"/accounts/{rotated}/token", headers=client())).status_code == 200
        await running.ctx.background.credential_expiry_once()
        for account_id in (with_cert, fed, rotated):
            await http.get(f"/accounts/{account_id}", headers=admin())
            await http.get(f"/accounts/{account_id}/events", headers=admin())
        await http.get("/accounts?credential_expires_before=2100-01-01T00:00:00Z", headers=admin())
        async with asyncio.timeout(10):
            while hook.call_count < 1:
                await asyncio.sleep(0.02)
        metrics = (await http.get("/metrics")).text

    assert assertions  # the refused ones were sent and echoed back
    pem_lines = [
        line
        for pem in (cert.pem(), cert.pem(pkcs1=True))
        for line in pem.splitlines()
        if line and not line.startswith("-----")
    ]
    forbidden = [*assertions, federated, *pem_lines, CLIENT_SECRET_1, CLIENT_SECRET_2]
    texts = {"logs": "\n".join(captured.lines), "metrics": metrics}
    texts |= {f"{m} {p} {s}": content for m, p, s, content in seen.responses}
    texts |= {f"hook {i}": c.request.content.decode() for i, c in enumerate(hook.calls)}
    for where, text in texts.items():
        assert not [f for f in forbidden if f in text], where
        assert "PRIVATE KEY-----\n" not in text, where
