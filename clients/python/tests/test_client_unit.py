"""BrokerCredential / AsyncBrokerCredential against a respx-mocked broker."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from azure.core.credentials import AccessToken, AccessTokenInfo, SupportsTokenInfo, TokenCredential
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

from dynamics_token_broker_client import (
    AsyncBrokerCredential,
    BrokerAuthenticationError,
    BrokerCredential,
    BrokerUnavailableError,
)

BROKER = "http://broker.test:8080"
ACCOUNT = "3f2a9c1e-0000-4000-8000-000000000001"
TOKEN_URL = f"{BROKER}/accounts/{ACCOUNT}/token"
KEY = "client-key-SECRET-0123456789abcdef"
API_URL = "https://contoso.crm.dynamics.com/api/data/v9.2"
SCOPE = "https://contoso.crm.dynamics.com/.default"
T0 = 1_800_000_000.0


def token_body(token: str = "eyJ.at-1.sig", expires_in: int = 3599, refresh_in: int = 3299) -> dict[str, Any]:
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "refresh_in": refresh_in,
        "expires_at": "2027-01-15T08:00:00Z",
        "api_url": API_URL,
        "account_id": ACCOUNT,
    }


def problem(status: int, code: str, detail: str) -> dict[str, Any]:
    return {
        "type": f"https://broker/problems/{code}",
        "title": code,
        "status": status,
        "code": code,
        "detail": detail,
    }


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def broker() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sync_cred(clock: Clock, **auth: Any) -> BrokerCredential:
    cred = BrokerCredential(BROKER, ACCOUNT, **(auth or {"key": KEY}))
    cred._clock = clock
    return cred


def async_cred(clock: Clock, **auth: Any) -> AsyncBrokerCredential:
    cred = AsyncBrokerCredential(BROKER, ACCOUNT, **(auth or {"key": KEY}))
    cred._clock = clock
    return cred


class Either:
    """Runs the same call on the sync or the async credential, for tests that hold for both."""

    def __init__(self, kind: str, clock: Clock, **auth: Any) -> None:
        self.kind = kind
        self.cred: BrokerCredential | AsyncBrokerCredential = (
            sync_cred(clock, **auth) if kind == "sync" else async_cred(clock, **auth)
        )

    async def token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        if isinstance(self.cred, BrokerCredential):
            return self.cred.get_token(*scopes, **kwargs)
        return await self.cred.get_token(*scopes, **kwargs)

    async def info(self, *scopes: str, **kwargs: Any) -> AccessTokenInfo:
        if isinstance(self.cred, BrokerCredential):
            return self.cred.get_token_info(*scopes, **kwargs)
        return await self.cred.get_token_info(*scopes, **kwargs)

    async def close(self) -> None:
        if isinstance(self.cred, BrokerCredential):
            self.cred.close()
        else:
            await self.cred.close()


@pytest.fixture(params=["sync", "async"])
async def either(request: pytest.FixtureRequest, clock: Clock) -> Any:
    made: list[Either] = []

    def make(**auth: Any) -> Either:
        made.append(Either(request.param, clock, **auth))
        return made[-1]

    yield make
    for e in made:
        await e.close()


# -- protocols ------------------------------------------------------------------------------------


async def test_isinstance_checks_of_azure_core_protocols() -> None:
    """azure-core's runtime protocol checks (which the Dataverse SDK runs) accept both credentials."""
    with BrokerCredential(BROKER, ACCOUNT, key=KEY) as sync:
        assert isinstance(sync, TokenCredential)
        assert isinstance(sync, SupportsTokenInfo)
    async with AsyncBrokerCredential(BROKER, ACCOUNT, key=KEY) as aio:
        assert isinstance(aio, AsyncTokenCredential)
        assert isinstance(aio, AsyncSupportsTokenInfo)


@pytest.mark.parametrize(
    "auth",
    [
        {},
        {"key": KEY, "key_file": "/k"},
        {"key_file": "/k", "service_account_token_file": "/t"},
        {"key": " "},
    ],
)
def test_exactly_one_key_source(auth: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"exactly one|empty"):
        BrokerCredential(BROKER, ACCOUNT, **auth)


# -- caching --------------------------------------------------------------------------------------


async def test_token_is_kept_until_refresh_on(either: Any, broker: respx.MockRouter, clock: Clock) -> None:
    """Many calls, one broker request; a new request once refresh_on (now + refresh_in) is reached."""
    route = broker.get(TOKEN_URL)
    route.side_effect = [
        httpx.Response(200, json=token_body("eyJ.first", expires_in=3000, refresh_in=100)),
        httpx.Response(200, json=token_body("eyJ.second", expires_in=3000, refresh_in=2700)),
    ]
    cred = either()
    info = await cred.info(SCOPE)
    assert (info.token, info.expires_on, info.refresh_on, info.token_type) == (
        "eyJ.first",
        int(T0) + 3000,
        int(T0) + 100,
        "Bearer",
    )
    token = await cred.token(SCOPE)
    assert (token.token, token.expires_on) == ("eyJ.first", int(T0) + 3000)
    for _ in range(20):
        assert (await cred.token(SCOPE)).token == "eyJ.first"
    clock.now = T0 + 99.5
    assert (await cred.token(SCOPE)).token == "eyJ.first"
    assert route.call_count == 1
    assert route.calls[0].request.headers["authorization"] == f"Bearer {KEY}"
    assert "min_ttl" not in str(route.calls[0].request.url)
    clock.now = T0 + 100
    assert (await cred.token(SCOPE)).token == "eyJ.second"
    assert route.call_count == 2


async def test_refresh_in_zero_is_asked_again_after_a_few_seconds(
    either: Any, broker: respx.MockRouter, clock: Clock
) -> None:
    """refresh_in=0 (the broker is refreshing in the background): not a broker request per call."""
    route = broker.get(TOKEN_URL)
    route.side_effect = [
        httpx.Response(200, json=token_body("eyJ.stale", expires_in=200, refresh_in=0)),
        httpx.Response(200, json=token_body("eyJ.fresh", expires_in=3599, refresh_in=3299)),
    ]
    cred = either()
    for _ in range(10):
        assert (await cred.token(SCOPE)).token == "eyJ.stale"
    clock.now = T0 + 5
    assert (await cred.token(SCOPE)).token == "eyJ.fresh"
    assert route.call_count == 2


async def test_one_http_client_per_credential(broker: respx.MockRouter, clock: Clock) -> None:
    broker.get(TOKEN_URL).respond(200, json=token_body(refresh_in=1))
    cred = sync_cred(clock)
    first = cred._http
    for n in range(3):
        clock.now = T0 + 2 * n
        cred.get_token(SCOPE)
    assert cred._http is first
    assert cred._http.timeout.read == 40.0
    assert cred._http.timeout.connect == 5.0
    cred.close()
    with pytest.raises(RuntimeError, match="closed"):
        cred.get_token(SCOPE)


# -- single flight --------------------------------------------------------------------------------


class CountingLock:
    """A lock that counts the threads that have come to it (holding or waiting)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.arrived = 0
        self.changed = threading.Condition()

    def __enter__(self) -> None:
        with self.changed:
            self.arrived += 1
            self.changed.notify_all()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait_for(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.arrived >= count, timeout=20)


def test_fifty_threads_share_one_broker_request(broker: respx.MockRouter, clock: Clock) -> None:
    """50 threads of a cold credential: one holds the broker request open until all 50 are at the lock."""
    arrived, release = threading.Event(), threading.Event()

    def held(_request: httpx.Request) -> httpx.Response:
        arrived.set()
        assert release.wait(20)
        return httpx.Response(200, json=token_body("eyJ.shared"))

    route = broker.get(TOKEN_URL).mock(side_effect=held)
    cred = sync_cred(clock)
    lock = cred._lock = CountingLock()  # type: ignore[assignment]
    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cred.get_token(SCOPE).token)) for _ in range(50)
    ]
    for t in threads:
        t.start()
    assert arrived.wait(20)
    lock.wait_for(50)  # every caller is holding or waiting for the lock while the request is open
    release.set()
    for t in threads:
        t.join(20)
    assert results == ["eyJ.shared"] * 50
    assert route.call_count == 1
    cred.close()


async def test_fifty_tasks_share_one_broker_request(broker: respx.MockRouter, clock: Clock) -> None:
    """50 tasks of a cold credential wait on the one request in flight (single-flight)."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(_request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return httpx.Response(200, json=token_body("eyJ.shared"))

    route = broker.get(TOKEN_URL).mock(side_effect=held)
    async with async_cred(clock) as cred:
        tasks = [asyncio.create_task(cred.get_token(SCOPE)) for _ in range(50)]
        await asyncio.wait_for(arrived.wait(), 20)
        assert len(cred._inflight) == 1
        assert not any(t.done() for t in tasks)  # all 50 are waiting on that one request
        release.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 20)
        assert {r.token for r in results} == {"eyJ.shared"}
        assert route.call_count == 1
        assert not cred._inflight


async def test_error_reaches_every_waiting_task_and_the_next_call_retries(
    broker: respx.MockRouter, clock: Clock
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    answers = [
        httpx.Response(
            503, json=problem(503, "upstream_unavailable", "Azure AD is down."), headers={"Retry-After": "3"}
        ),
        httpx.Response(200, json=token_body("eyJ.after")),
    ]

    async def held(_request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return answers.pop(0)

    route = broker.get(TOKEN_URL).mock(side_effect=held)
    async with async_cred(clock) as cred:
        tasks = [asyncio.create_task(cred.get_token(SCOPE)) for _ in range(50)]
        await asyncio.wait_for(arrived.wait(), 20)
        release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, BrokerUnavailableError) and r.retry_after == 3 for r in results)
        assert route.call_count == 1
        assert (await cred.get_token(SCOPE)).token == "eyJ.after"
        assert route.call_count == 2


async def test_a_cancelled_waiter_does_not_cancel_the_request(broker: respx.MockRouter, clock: Clock) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(_request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return httpx.Response(200, json=token_body("eyJ.kept"))

    route = broker.get(TOKEN_URL).mock(side_effect=held)
    async with async_cred(clock) as cred:
        first = asyncio.create_task(cred.get_token(SCOPE))
        second = asyncio.create_task(cred.get_token(SCOPE))
        await asyncio.wait_for(arrived.wait(), 20)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        assert (await second).token == "eyJ.kept"
        assert (await cred.get_token(SCOPE)).token == "eyJ.kept"
        assert route.call_count == 1


# -- errors ---------------------------------------------------------------------------------------

REFUSALS = [
    (401, "unauthorized", "The API key is missing or invalid: send Authorization: Bearer <key>."),
    (403, "forbidden", "This key may not read tokens."),
    (404, "account_not_found", "No account 3f2a; create it with POST /accounts or use a key for it."),
    (409, "needs_authorization", "A person must sign in again: open /accounts/3f2a/authorize."),
    (409, "invalid_credentials", "Azure AD rejected the client secret: update it with PATCH /accounts/3f2a."),
]


@pytest.mark.parametrize(("status", "code", "detail"), REFUSALS)
async def test_refusals_are_client_authentication_errors_with_the_detail(
    either: Any, broker: respx.MockRouter, status: int, code: str, detail: str
) -> None:
    broker.get(TOKEN_URL).respond(
        status, json=problem(status, code, detail), headers={"content-type": "application/problem+json"}
    )
    cred = either()
    with pytest.raises(ClientAuthenticationError) as caught:
        await cred.token(SCOPE)
    err = caught.value
    assert isinstance(err, BrokerAuthenticationError)
    assert (err.code, err.detail, err.status) == (code, detail, status)
    assert detail in str(err)
    assert code in str(err)
    assert KEY not in str(err) + repr(err)


async def test_503_is_service_request_error_with_retry_after(either: Any, broker: respx.MockRouter) -> None:
    broker.get(TOKEN_URL).respond(
        503,
        json=problem(503, "upstream_unavailable", "Azure AD is throttling; the broker retries."),
        headers={"Retry-After": "27"},
    )
    cred = either()
    with pytest.raises(ServiceRequestError) as caught:
        await cred.token(SCOPE)
    err = caught.value
    assert isinstance(err, BrokerUnavailableError)
    assert not isinstance(err, ClientAuthenticationError)
    assert err.retry_after == 27
    assert err.code == "upstream_unavailable"
    assert "Retry after 27 s" in str(err)
    assert "throttling" in str(err)


async def test_network_error_is_service_request_error(either: Any, broker: respx.MockRouter) -> None:
    broker.get(TOKEN_URL).mock(side_effect=httpx.ConnectError("connection refused"))
    cred = either()
    with pytest.raises(
        ServiceRequestError, match=re.escape("Could not reach the token broker at http://broker.test:8080")
    ):
        await cred.token(SCOPE)


async def test_malformed_200_is_not_a_token(either: Any, broker: respx.MockRouter) -> None:
    broker.get(TOKEN_URL).respond(200, text="<html>proxy login</html>")
    cred = either()
    with pytest.raises(ServiceRequestError, match="without a usable token"):
        await cred.token(SCOPE)


# -- claims challenge -----------------------------------------------------------------------------


async def test_claims_challenge_forces_one_fresh_token(
    either: Any, broker: respx.MockRouter, clock: Clock
) -> None:
    """A non-empty claims asks ?min_ttl=<remaining + 1>, which makes the broker refresh; then cached."""
    route = broker.get(TOKEN_URL)
    route.side_effect = [
        httpx.Response(200, json=token_body("eyJ.revoked", expires_in=2000, refresh_in=1700)),
        httpx.Response(200, json=token_body("eyJ.new", expires_in=3599, refresh_in=3299)),
    ]
    cred = either()
    assert (await cred.token(SCOPE)).token == "eyJ.revoked"
    clock.now = T0 + 10
    challenge = '{"access_token":{"nbf":{"essential":true,"value":"1700000000"}}}'
    assert (await cred.token(SCOPE, claims=challenge)).token == "eyJ.new"
    assert route.calls[1].request.url.params["min_ttl"] == "1991"
    assert (await cred.info(SCOPE)).token == "eyJ.new"
    assert route.call_count == 2
    assert (await cred.token(SCOPE, claims="")).token == "eyJ.new"  # empty claims: no challenge
    assert route.call_count == 2


async def test_claims_via_token_info_options(broker: respx.MockRouter, clock: Clock) -> None:
    route = broker.get(TOKEN_URL)
    route.side_effect = [
        httpx.Response(200, json=token_body("eyJ.a")),
        httpx.Response(200, json=token_body("eyJ.b")),
    ]
    with sync_cred(clock) as cred:
        assert cred.get_token_info(SCOPE).token == "eyJ.a"
        assert cred.get_token_info(SCOPE, options={"claims": "c"}).token == "eyJ.b"
        assert route.calls[1].request.url.params["min_ttl"] == "3600"  # capped at the broker's bound


# -- key files ------------------------------------------------------------------------------------


async def test_key_file_is_re_read_when_it_changes(
    either: Any, broker: respx.MockRouter, clock: Clock, tmp_path: Path
) -> None:
    route = broker.get(TOKEN_URL).respond(200, json=token_body(refresh_in=10))
    path = tmp_path / "key"
    path.write_text("first-key-value\n")
    cred = either(key_file=str(path))
    await cred.token(SCOPE)
    path.write_text("second-key-value-longer\n")
    clock.now = T0 + 10
    await cred.token(SCOPE)
    assert [c.request.headers["authorization"] for c in route.calls] == [
        "Bearer first-key-value",
        "Bearer second-key-value-longer",
    ]


async def test_projected_service_account_token_rotated_by_symlink_swap(
    either: Any, broker: respx.MockRouter, clock: Clock, tmp_path: Path
) -> None:
    """kubelet writes a new ..<timestamp> directory and swaps the ..data symlink atomically."""
    route = broker.get(TOKEN_URL).respond(200, json=token_body(refresh_in=10))

    def publish(n: int, token: str) -> None:
        folder = tmp_path / f"..2026_12_01_0{n}"
        folder.mkdir()
        (folder / "token").write_text(token)
        tmp = tmp_path / "..data_tmp"
        tmp.symlink_to(folder.name)
        os.replace(tmp, tmp_path / "..data")

    publish(1, "eyJhbGciOi.sa-token-one.sig")
    (tmp_path / "token").symlink_to("..data/token")
    cred = either(service_account_token_file=str(tmp_path / "token"))
    await cred.token(SCOPE)
    clock.now = T0 + 10
    await cred.token(SCOPE)  # unchanged file: read once, same header
    publish(2, "eyJhbGciOi.sa-token-two.sig")  # same length as before: found by the new inode
    clock.now = T0 + 20
    await cred.token(SCOPE)
    assert [c.request.headers["authorization"] for c in route.calls] == [
        "Bearer eyJhbGciOi.sa-token-one.sig",
        "Bearer eyJhbGciOi.sa-token-one.sig",
        "Bearer eyJhbGciOi.sa-token-two.sig",
    ]


@pytest.mark.parametrize("content", [None, "  \n"])
async def test_missing_or_empty_key_file(
    either: Any, broker: respx.MockRouter, tmp_path: Path, content: Any
) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    cred = either(key_file=str(path))
    with pytest.raises(ClientAuthenticationError, match=re.escape(str(path))):
        await cred.token(SCOPE)
    assert not broker.calls


# -- scopes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scope",
    [
        SCOPE,
        "https://contoso.crm.dynamics.com/user_impersonation",
        "https://contoso.crm.dynamics.com",
        "https://contoso.crm.dynamics.com/",
        "HTTPS://Contoso.CRM.dynamics.com:443/.default",
    ],
)
async def test_scopes_naming_the_account_origin_are_accepted(
    either: Any, broker: respx.MockRouter, scope: str
) -> None:
    broker.get(TOKEN_URL).respond(200, json=token_body())
    cred = either()
    assert (await cred.token(scope)).token == "eyJ.at-1.sig"
    assert (await cred.token(scope)).token == "eyJ.at-1.sig"


async def test_a_scope_of_another_organization_is_refused_on_every_call(
    either: Any, broker: respx.MockRouter
) -> None:
    """The credential learns api_url from the first answer; a scope for another org is an error."""
    route = broker.get(TOKEN_URL).respond(200, json=token_body())
    cred = either()
    for _ in range(2):  # the first call (api_url learnt from the answer) and a cached one
        with pytest.raises(ClientAuthenticationError) as caught:
            await cred.token("https://fabrikam.crm4.dynamics.com/.default")
        message = str(caught.value)
        assert "fabrikam.crm4.dynamics.com" in message
        assert "https://contoso.crm.dynamics.com" in message
    assert route.call_count == 1
    assert (await cred.token(SCOPE)).token == "eyJ.at-1.sig"


@pytest.mark.parametrize(
    "scopes", [(), ("User.Read",), ("https://graph.microsoft.com/User.Read",), ("api://x/.default",)]
)
async def test_malformed_scopes_are_refused_without_a_broker_request(
    either: Any, broker: respx.MockRouter, scopes: tuple[str, ...]
) -> None:
    cred = either()
    with pytest.raises(ClientAuthenticationError, match=r"[Ss]cope"):
        await cred.token(*scopes)
    assert not broker.calls


# -- secrets --------------------------------------------------------------------------------------


async def test_no_key_or_token_in_messages_repr_or_logs(
    either: Any, broker: respx.MockRouter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    access_token = "eyJ0eXAiOiJKV1Qi.SECRET-ACCESS-TOKEN.sig"
    route = broker.get(TOKEN_URL)
    route.side_effect = [
        httpx.Response(200, json=token_body(access_token, refresh_in=5)),
        httpx.Response(409, json=problem(409, "needs_authorization", "Sign in again.")),
        httpx.Response(
            503, json=problem(503, "upstream_unavailable", "Later."), headers={"Retry-After": "1"}
        ),
        httpx.ConnectError("refused"),
        httpx.Response(401, json=problem(401, "unauthorized", "Bad key.")),
    ]
    cred = either()
    texts = [repr(cred.cred), str(cred.cred)]
    assert (await cred.token(SCOPE)).token == access_token
    for n in range(4):
        clock.now = T0 + 10 * (n + 1)
        with pytest.raises((ClientAuthenticationError, ServiceRequestError)) as caught:
            await cred.token(SCOPE)
        texts += [str(caught.value), repr(caught.value), str(caught.value.__dict__)]
    with pytest.raises(ClientAuthenticationError) as caught:
        await cred.token("https://other.crm.dynamics.com/.default")
    texts += [str(caught.value), repr(cred.cred), repr(cred.cred._entry)]
    texts.append(caplog.text)
    assert any("token for account" in r.getMessage() for r in caplog.records)  # there is a log line
    for text in texts:
        assert KEY not in text
        assert "SECRET-ACCESS-TOKEN" not in text
