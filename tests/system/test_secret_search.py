"""No secret leaks on any failure path: one table of paths, one search over everything they leave.

Every row drives one way a request can fail (each class of Azure AD answer for each grant, a failed
WhoAmI, a failed webhook delivery, a stored secret that cannot be decrypted, ``rotate-keys``). The
fakes are hostile: Azure AD, Dynamics and the webhook receiver echo every secret they were sent in
their bodies, headers and exception messages. Logs are captured at DEBUG (the root logger and every
``service.*`` logger, through the service's own formatter; the raw records and exception messages
too), and then the log, every response, the stored events and ``last_error``, ``/metrics``, what
went to the webhook and what the CLI printed are searched for every secret value: client secret,
refresh token, access token, API keys, webhook secret, encryption key, authorization code, PKCE
verifier and state. A new failure path is one row in one of the tables below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import httpx
import pytest
import respx
from sqlalchemy import select, update

from service import cli, logconfig, migrate
from service.kit.crypto import generate_key
from service.models import Account, AccountState, Event
from service.settings import Settings
from tests.api.test_logging import Capture, Seen, forms
from tests.conftest import (
    ADMIN_KEY,
    API_URL,
    CLIENT_KEY,
    ENCRYPTION_KEY,
    TOKEN_URL_V1,
    Running,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

CLIENT_SECRET = "cs-search-Secret~aaaa.1111"
OTHER_SECRET = "cs-search-Other~bbbb.2222"
REFRESH_TOKEN = "0.AR-search-refresh-secret-3333"
ACCESS_TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.search-access-secret.sig5"
CODE = "0.AQ-search-authorization-code-6666"
HOOK = "https://hooks.example.internal/search"
HOOK_SECRET = "whsec-search-secret-7777"
SECRETS = (
    CLIENT_SECRET,
    OTHER_SECRET,
    REFRESH_TOKEN,
    ACCESS_TOKEN,
    CODE,
    HOOK_SECRET,
    ADMIN_KEY,
    CLIENT_KEY,
    ENCRYPTION_KEY,
)
_SENT_SECRETS = ("client_secret", "refresh_token", "code", "code_verifier")


@dataclass
class World:
    """One row's app, fakes and what it has seen."""

    running: Running
    azure: respx.MockRouter
    capsys: pytest.CaptureFixture[str]
    seen: Seen
    found: set[str] = field(default_factory=set)  # secrets known only at run time
    states: set[str] = field(default_factory=set)  # of the authorizations started
    printed: list[str] = field(default_factory=list)  # what a CLI command wrote
    accounts: list[str] = field(default_factory=list)

    @property
    def http(self) -> httpx.AsyncClient:
        return self.running.client

    async def account(self, **overrides: Any) -> str:
        body = account_body(client_secret=CLIENT_SECRET, refresh_token=REFRESH_TOKEN) | overrides
        r = await self.http.post("/accounts", json=body, headers=admin())
        assert r.status_code == 201, r.text
        account_id: str = r.json()["id"]
        self.accounts.append(account_id)
        return account_id

    def token_endpoint(self, answer: Answer) -> respx.Route:
        """Azure AD's token endpoint giving ``answer``; PKCE verifiers it receives join the search."""

        def endpoint(request: httpx.Request) -> httpx.Response:
            verifier = dict(parse_qsl(request.content.decode())).get("code_verifier")
            if verifier:
                self.found.add(verifier)
            return answer(request)

        return self.azure.post(TOKEN_URL_V1).mock(side_effect=endpoint)


Answer = Callable[[httpx.Request], httpx.Response]
Drive = Callable[[World], Awaitable[None]]


def echo(request: httpx.Request) -> str:
    """Everything secret the request carried, as a hostile server would quote it back."""
    sent = dict(parse_qsl(request.content.decode()))
    values = [sent[k] for k in _SENT_SECRETS if sent.get(k)]
    values.append(request.headers.get("Authorization", ""))
    values.append(request.headers.get("X-Broker-Signature", ""))
    return f"you sent {' and '.join(v for v in values if v)} ({request.content.decode()})"


def oauth_error(status: int, error: str, code: int, **headers: str) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        body = {
            "error": error,
            "error_description": f"AADSTS{code}: refused. {echo(request)}\r\nTrace ID: 1\r\nTimestamp: x",
            "error_codes": [code],
        }
        return httpx.Response(status, json=body, headers=headers)

    return answer


def raising(kind: type[httpx.TransportError]) -> Answer:
    def answer(request: httpx.Request) -> httpx.Response:
        raise kind(echo(request), request=request)

    return answer


# Each class of answer Azure AD (or something in its place) can give a token request.
AZURE_ANSWERS: dict[str, Answer] = {
    "invalid_grant": oauth_error(400, "invalid_grant", 70008),
    "invalid_client": oauth_error(401, "invalid_client", 7000215),
    "unauthorized_client": oauth_error(400, "unauthorized_client", 700016),
    "interaction_required": oauth_error(400, "interaction_required", 50076),
    "consent_required": oauth_error(400, "consent_required", 65001),
    "login_required": oauth_error(400, "login_required", 50058),
    "invalid_resource": oauth_error(400, "invalid_resource", 500011),
    "429 with Retry-After": oauth_error(429, "temporarily_unavailable", 50196, **{"Retry-After": "7"}),
    "500 text": lambda r: httpx.Response(500, text=echo(r)),
    "503 temporarily_unavailable": oauth_error(503, "temporarily_unavailable", 50196),
    "timeout": raising(httpx.ReadTimeout),
    "connection error": raising(httpx.ConnectError),
    "200 bad JSON": lambda r: httpx.Response(200, text="{not json " + echo(r)),
    "200 without an access token": lambda r: httpx.Response(200, json={"token_type": "Bearer", "x": echo(r)}),
    "400 not JSON": lambda r: httpx.Response(400, text="<html>" + echo(r) + "</html>"),
    "302 redirect": lambda r: httpx.Response(
        302, headers={"Location": "https://x.example/?" + urlencode({"e": echo(r)})}
    ),
}


async def refresh_grant(w: World) -> None:
    account_id = await w.account()
    r = await w.http.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code in (409, 503), r.text


async def client_credentials_grant(w: World) -> None:
    account_id = await w.account(grant_type="client_credentials", refresh_token=None)
    r = await w.http.get(f"/accounts/{account_id}/token", headers=client())
    assert r.status_code in (409, 503), r.text


async def started_authorization(w: World, **body: str) -> tuple[str, str]:
    """A new account without a refresh token, and the state of the authorization started for it."""
    account_id = await w.account(refresh_token=None)
    r = await w.http.post(f"/accounts/{account_id}/authorize", json=body, headers=admin())
    assert r.status_code == 200, r.text
    state: str = r.json()["state"]
    w.found.add(state)
    w.states.add(state)
    return account_id, state


async def pasted_code_exchange(w: World) -> None:
    account_id, state = await started_authorization(w, redirect_uri="http://localhost")
    pasted = f"http://localhost/?code={quote(CODE)}&state={state}&session_state=s"
    r = await w.http.post(
        f"/accounts/{account_id}/authorization-code", json={"code": pasted}, headers=admin()
    )
    assert r.status_code in (409, 503), r.text
    assert w.found - w.states, "a PKCE verifier went to Azure AD and is searched for"


async def hosted_callback_exchange(w: World) -> None:
    _, state = await started_authorization(w)
    r = await w.http.get("/oauth/callback", params={"code": CODE, "state": state})
    assert r.status_code >= 400, r.text
    assert w.found - w.states, "a PKCE verifier went to Azure AD and is searched for"


GRANTS: dict[str, Drive] = {
    "refresh": refresh_grant,
    "client_credentials": client_credentials_grant,
    "code exchange (pasted URL, PKCE)": pasted_code_exchange,
    "code exchange (hosted callback)": hosted_callback_exchange,
}


def grant_row(grant: Drive, answer: Answer) -> Drive:
    async def drive(w: World) -> None:
        route = w.token_endpoint(answer)
        await grant(w)
        assert route.called

    return drive


def whoami_row(answer: Answer) -> Drive:
    """A good token, then Dynamics failing the WhoAmI call made with it."""

    async def drive(w: World) -> None:
        w.token_endpoint(lambda _r: httpx.Response(200, json=v1_token(ACCESS_TOKEN, None)))
        whoami = w.azure.get(f"{API_URL}/WhoAmI").mock(side_effect=answer)
        account_id = await w.account()
        r = await w.http.post(f"/accounts/{account_id}/test", headers=admin())
        assert r.status_code == 200, r.text
        assert r.json()["ok"] is False
        assert whoami.called

    return drive


DYNAMICS_ANSWERS: dict[str, Answer] = {
    "401": lambda r: httpx.Response(401, text=echo(r), headers={"WWW-Authenticate": echo(r)}),
    "403": lambda r: httpx.Response(403, json={"error": {"message": echo(r)}}),
    "500": lambda r: httpx.Response(500, text=echo(r)),
    "timeout": raising(httpx.ReadTimeout),
    "connection error": raising(httpx.ConnectError),
    "200 bad JSON": lambda r: httpx.Response(200, text="{" + echo(r)),
    "302 redirect": lambda r: httpx.Response(
        302, headers={"Location": "https://x.example/?" + urlencode({"e": echo(r)})}
    ),
}


def webhook_row(answer: Answer) -> Drive:
    """A refresh Azure AD refuses changes the account's status; the webhook receiver fails twice."""

    async def drive(w: World) -> None:
        w.token_endpoint(AZURE_ANSWERS["invalid_grant"])
        hook = w.azure.post(HOOK).mock(side_effect=answer)
        await refresh_grant(w)
        async with asyncio.timeout(10):
            while hook.call_count < 2:  # the first delivery and one retry
                await asyncio.sleep(0.02)

    return drive


WEBHOOK_ANSWERS: dict[str, Answer] = {
    "500": lambda r: httpx.Response(500, text=echo(r)),
    "timeout": raising(httpx.ReadTimeout),
    "connection error": raising(httpx.ConnectError),
    "302 redirect": lambda r: httpx.Response(
        302, headers={"Location": "https://x.example/?" + urlencode({"e": echo(r)})}
    ),
}


async def moved_ciphertext(w: World) -> tuple[str, str]:
    """Two accounts; the first one's stored client secret copied onto the second, in the database."""
    first = await w.account()
    second = await w.account(client_secret=OTHER_SECRET)
    async with w.running.ctx.engine.begin() as conn:
        stored = (await conn.execute(select(Account.client_secret).where(Account.id == first))).scalar_one()
        await conn.execute(update(Account).where(Account.id == second).values(client_secret=stored))
    return first, second


async def decryption_failed(w: World) -> None:
    """A stored secret that does not open: the token, the connection test and a code exchange."""
    route = w.token_endpoint(lambda _r: httpx.Response(200, json=v1_token(ACCESS_TOKEN, None)))
    _, second = await moved_ciphertext(w)
    r = await w.http.get(f"/accounts/{second}/token", headers=client())
    assert (r.status_code, r.json()["reason"]) == (503, "decryption_failed")
    await w.http.post(f"/accounts/{second}/test", headers=admin())
    await w.http.post(f"/accounts/{second}/authorization-code", json={"code": CODE}, headers=admin())
    assert not route.called


async def run_cli(w: World, *argv: str, env: dict[str, str]) -> int:
    """``token-broker <argv>`` in this process (its own event loop, in a thread), output kept."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the command sets up logging its own way
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        try:
            code = await asyncio.to_thread(cli.main, list(argv))
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    out, err = w.capsys.readouterr()
    w.printed.append(out + err)
    return code


def cli_env(w: World, keys: str) -> dict[str, str]:
    return {
        "BROKER_DATABASE_URL": w.running.settings.database_url,
        "BROKER_ENCRYPTION_KEYS": keys,
        "BROKER_LOG_LEVEL": "DEBUG",
    }


async def rotate_keys(w: World) -> None:
    """Every stored secret (and a cached access token) re-encrypted under a new key."""
    w.token_endpoint(lambda _r: httpx.Response(200, json=v1_token(ACCESS_TOKEN, None)))
    account_id = await w.account()
    assert (await w.http.get(f"/accounts/{account_id}/token", headers=client())).status_code == 200
    await started_authorization(w)  # a pending authorization's verifier is rotated too
    assert await run_cli(w, "rotate-keys", env=cli_env(w, f"{generate_key()},{ENCRYPTION_KEY}")) == 0
    assert "re-encrypted" in w.printed[-1]


async def rotate_keys_refused(w: World) -> None:
    """rotate-keys meeting a value that does not open: it stops, saying which column and account."""
    await moved_ciphertext(w)
    assert await run_cli(w, "rotate-keys", env=cli_env(w, f"{generate_key()},{ENCRYPTION_KEY}")) != 0
    assert "CLIENT_SECRET" in w.printed[-1]


PATHS: dict[str, Drive] = {
    **{f"{g}: {a}": grant_row(GRANTS[g], AZURE_ANSWERS[a]) for g in GRANTS for a in AZURE_ANSWERS},
    **{f"WhoAmI: {a}": whoami_row(answer) for a, answer in DYNAMICS_ANSWERS.items()},
    **{f"webhook delivery: {a}": webhook_row(answer) for a, answer in WEBHOOK_ANSWERS.items()},
    "decryption failed": decryption_failed,
    "rotate-keys": rotate_keys,
    "rotate-keys refused": rotate_keys_refused,
}


@contextlib.contextmanager
def capture_debug() -> Iterator[Capture]:
    """The service's logging set-up at DEBUG (what ``token-broker serve`` does at its most verbose),
    every ``service.*`` logger at DEBUG too, and a handler that keeps the lines and the records."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    names = [n for n in logging.root.manager.loggerDict if n == "service" or n.startswith("service.")]
    quieted = ["httpx", "httpcore", "uvicorn.access", "alembic", "aiosqlite", "aiomysql", "sqlalchemy"]
    levels = {name: logging.getLogger(name).level for name in [*names, *quieted]}
    logconfig.configure("DEBUG")
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    capture = Capture()
    root.handlers[:] = [capture, *saved[0]]  # pytest's own handlers stay, for its reports
    try:
        yield capture
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


def logged_text(capture: Capture) -> str:
    """The formatted lines, and what a less careful handler would print: raw messages, exceptions."""
    parts = list(capture.lines)
    for record in capture.records:
        parts.append(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            exc: BaseException | None = record.exc_info[1]
            while exc is not None:
                parts.append(f"{type(exc).__name__}: {exc}")
                exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def leaked(text: str, secrets: set[str]) -> list[str]:
    return sorted(s for s in secrets if any(f in text for f in forms(s)))


async def stored_text(running: Running) -> str:
    """Every stored event and every account's last error, read straight from the database."""
    async with running.ctx.engine.connect() as conn:
        events = (await conn.execute(select(Event.kind, Event.detail))).all()
        errors = (
            await conn.execute(select(AccountState.last_error_code, AccountState.last_error_message))
        ).all()
    return json.dumps([list(map(str, row)) for row in [*events, *errors]])


@pytest.fixture
async def search_settings(sqlite_url: str, tmp_path: Path) -> Settings:
    await migrate.upgrade(sqlite_url)
    return make_settings(
        sqlite_url,
        tmp_path,
        webhook_url=HOOK,
        webhook_secret=HOOK_SECRET,
        webhook_poll_seconds=0.05,
        webhook_backoff_base_seconds=0.0,
    )


@pytest.mark.parametrize("drive", PATHS.values(), ids=PATHS.keys())
async def test_no_secret_on_a_failure_path(
    search_settings: Settings,
    run_app: Callable[[Settings], Any],
    azure: respx.MockRouter,
    capsys: pytest.CaptureFixture[str],
    drive: Drive,
) -> None:
    """The path's log (DEBUG), responses, stored events and errors, metrics, webhook requests and CLI
    output carry no secret value (a 200 token response carries its own access token only)."""
    azure.post(HOOK).respond(200)  # a row may answer otherwise
    with capture_debug() as captured:
        async with run_app(search_settings) as running:
            w = World(running, azure, capsys, Seen())
            running.client.event_hooks["response"].append(w.seen)
            await drive(w)
            for account_id in w.accounts:  # what the account and its history say about it
                await w.http.get(f"/accounts/{account_id}", headers=admin())
                await w.http.get(f"/accounts/{account_id}/events", headers=admin())
            metrics = (await w.http.get("/metrics")).text
            stored = await stored_text(running)
    secrets = {*SECRETS, *w.found}
    assert captured.records, "nothing was logged: the capture is not working"
    assert leaked(logged_text(captured), secrets) == [], "in the log"
    for method, path, status, content in w.seen.responses:
        # Only its own answer may carry a secret: a token response its access token, an
        # authorization's start its state.
        allowed = {ACCESS_TOKEN} if path.endswith("/token") and status == 200 else set()
        allowed |= w.states if path.endswith("/authorize") and status == 200 else set()
        assert leaked(content, secrets - allowed) == [], f"in the response to {method} {path} ({status})"
    assert leaked(stored, secrets) == [], "in the stored events or last_error"
    assert leaked(metrics, secrets) == [], "in /metrics"
    assert leaked("\n".join(w.printed), secrets) == [], "in what the CLI printed"
    for call in azure.calls:
        if str(call.request.url) == HOOK:
            wire = call.request.content.decode() + str(call.request.headers)
            assert leaked(wire, secrets) == [], "in a webhook request"
