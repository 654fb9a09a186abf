"""Webhook notifications of status changes: signed, secret-free, retried, in order, sent once.

The webhook endpoint is a route on the strict ``azure`` respx router (the app's one httpx client
carries both). Delivery runs in the app's own loop with short intervals; tests wait on what the
receiver saw, and on the cursor reaching the newest event before asserting that nothing more came.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import func, select

from service import migrate
from service.accounts import repository as accounts_repo
from service.errors import ConfigurationError
from service.kit import timeutil
from service.kit.db import create_engine, create_sessionmaker
from service.metrics import Metrics
from service.models import Event, Lease
from service.settings import Settings
from service.webhooks.delivery import check_url
from service.webhooks.service import CURSOR, LEASE, Notifier, lease_ttl
from tests.conftest import (
    CLIENT_SECRET,
    REFRESH_TOKEN,
    TOKEN_URL_V1,
    account_body,
    admin,
    client,
    make_settings,
    v1_token,
)

HOOK = "https://hooks.example.internal/broker"
HOOK_SECRET = "whsec-0123456789-abcdefghij"
FAST = {
    "webhook_url": HOOK,
    "webhook_secret": HOOK_SECRET,
    "webhook_poll_seconds": 0.05,
    "webhook_backoff_base_seconds": 0.01,
    "webhook_backoff_max_seconds": 0.05,
    "webhook_gap_grace_seconds": 1.0,
}
EXPIRED_GRANT = {
    "error": "invalid_grant",
    "error_description": f"AADSTS700082: The refresh token {REFRESH_TOKEN} has expired due to inactivity.",
    "error_codes": [700082],
}
BAD_CLIENT = {
    "error": "invalid_client",
    "error_description": f"AADSTS7000215: Invalid client secret provided: {CLIENT_SECRET}",
    "error_codes": [7000215],
}


@dataclass
class Receiver:
    """The webhook endpoint: answers ``script`` first (then 200), records every request."""

    script: list[int] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        status = self.script.pop(0) if self.script else 200
        self.requests.append(request)
        self.answers.append(status)
        self.arrived.set()
        return httpx.Response(status)

    async def wait(self, count: int, seconds: float = 10.0) -> None:
        async with asyncio.timeout(seconds):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies of the requests answered 2xx, each verified: signature, headers, no secret."""
        return [verified(r) for r, status in zip(self.requests, self.answers, strict=True) if status < 300]


def verified(request: httpx.Request, event: str = "account.status_changed") -> dict[str, Any]:
    """Check the signature and headers as a receiver would, and that no secret went out."""
    body = request.content
    timestamp = request.headers["X-Broker-Timestamp"]
    expected = hmac.new(HOOK_SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(request.headers["X-Broker-Signature"], f"sha256={expected}")
    assert abs(int(timestamp) - time.time()) < 60
    assert request.headers["Content-Type"] == "application/json"
    doc: dict[str, Any] = json.loads(body)
    assert request.headers["X-Broker-Event-Id"] == str(doc["id"])
    wire = body.decode() + "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    for secret in (CLIENT_SECRET, REFRESH_TOKEN, HOOK_SECRET, "rt-new", "at-1", "at-2"):
        assert secret not in wire
    assert doc["event"] == event
    assert doc["at"].endswith("Z")
    datetime.fromisoformat(doc["at"].removesuffix("Z"))
    return doc


@pytest.fixture
async def hook_settings(database_url: str, tmp_path: Path) -> Settings:
    await migrate.upgrade(database_url)
    return make_settings(database_url, tmp_path, **FAST)


@pytest.fixture
def receiver(azure: respx.MockRouter) -> Receiver:
    got = Receiver()
    azure.post(HOOK).mock(side_effect=got)
    return got


@pytest.fixture
async def hooked(hook_settings: Settings, run_app: Callable[[Settings], Any]) -> AsyncIterator[Any]:
    async with run_app(hook_settings) as running:
        yield running


async def create(running: Any, **overrides: Any) -> dict[str, Any]:
    r = await running.client.post("/accounts", json=account_body(**overrides), headers=admin())
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def leases(settings: Settings) -> dict[str, tuple[str, datetime]]:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            rows = await session.execute(select(Lease.name, Lease.holder, Lease.expires_at))
            return {name: (holder, expires) for name, holder, expires in rows}
    finally:
        await engine.dispose()


async def drained(settings: Settings, seconds: float = 10.0) -> None:
    """Wait until the cursor has reached the newest event: every notification is done with."""
    engine = create_engine(settings)
    try:
        async with asyncio.timeout(seconds):
            while True:
                async with create_sessionmaker(engine)() as session:
                    newest = await session.scalar(select(func.max(Event.id)))
                    cursor = await session.get(Lease, CURSOR)
                if cursor is not None and int(cursor.holder) >= (newest or 0):
                    return
                await asyncio.sleep(0.02)
    finally:
        await engine.dispose()


def delivered_count(running: Any, outcome: str = "delivered") -> float:
    value = running.ctx.metrics.registry.get_sample_value(
        "broker_webhook_deliveries_total", {"outcome": outcome}
    )
    return float(value or 0.0)


# -- notifications --------------------------------------------------------------------------------


async def test_failed_refresh_sends_a_signed_notification_without_secrets(
    hooked: Any, azure: respx.MockRouter, receiver: Receiver
) -> None:
    """invalid_grant: one signed account.status_changed, ready -> needs_authorization, no secret."""
    azure.post(TOKEN_URL_V1).respond(400, json=EXPIRED_GRANT)
    account = await create(hooked)
    r = await hooked.client.get(f"/accounts/{account['id']}/token", headers=client())
    assert r.json()["code"] == "needs_authorization"
    await receiver.wait(1)
    await drained(hooked.settings)
    [doc] = receiver.delivered()
    assert set(doc) == {"event", "id", "account_id", "account_name", "from", "to", "code", "message", "at"}
    assert (doc["account_id"], doc["account_name"]) == (account["id"], account["name"])
    assert (doc["from"], doc["to"], doc["code"]) == ("ready", "needs_authorization", "invalid_grant")
    assert "expired due to inactivity" in doc["message"]
    assert "[redacted]" in doc["message"]
    assert isinstance(doc["id"], int)
    assert delivered_count(hooked) == 1


async def test_recovery_sends_a_ready_notification(
    hooked: Any, azure: respx.MockRouter, receiver: Receiver
) -> None:
    """A new refresh token after invalid_grant: a second notification, back to ready, in order."""
    route = azure.post(TOKEN_URL_V1)
    route.side_effect = [
        httpx.Response(400, json=EXPIRED_GRANT),
        httpx.Response(200, json=v1_token("at-2", "rt-3")),
    ]
    account = await create(hooked)
    path = f"/accounts/{account['id']}/token"
    assert (await hooked.client.get(path, headers=client())).status_code == 409
    r = await hooked.client.patch(
        f"/accounts/{account['id']}", json={"refresh_token": "rt-new"}, headers=admin()
    )
    assert r.json()["status"] == "ready", r.text
    assert (await hooked.client.get(path, headers=client())).status_code == 200
    await receiver.wait(2)
    await drained(hooked.settings)
    failed, recovered = receiver.delivered()
    assert failed["to"] == "needs_authorization"
    assert (recovered["from"], recovered["to"], recovered["code"]) == ("needs_authorization", "ready", None)
    assert "message" not in recovered
    assert failed["id"] < recovered["id"]
    assert len(receiver.requests) == 2


async def test_failing_endpoint_is_retried_then_each_event_delivered_once_in_order(
    hooked: Any, azure: respx.MockRouter, receiver: Receiver
) -> None:
    """500, 500, then 200: the first event is delivered on its third try, the second after it."""
    receiver.script = [500, 500]
    azure.post(TOKEN_URL_V1).mock(
        side_effect=lambda request: httpx.Response(
            400, json=EXPIRED_GRANT if b"refresh_token=" + REFRESH_TOKEN.encode() in request.content else {}
        )
    )
    first = await create(hooked)
    second = await create(hooked, refresh_token="other-refresh-token")
    for account in (first, second):
        r = await hooked.client.get(f"/accounts/{account['id']}/token", headers=client())
        assert r.status_code in (409, 503), r.text
    await receiver.wait(4)
    await drained(hooked.settings)
    ids = [json.loads(r.content)["id"] for r in receiver.requests]
    assert ids[0] == ids[1] == ids[2] < ids[3]
    assert len(ids) == 4
    for request in receiver.requests:
        verified(request)
    assert [json.loads(r.content)["account_id"] for r in receiver.requests[2:]] == [first["id"], second["id"]]
    assert (delivered_count(hooked), delivered_count(hooked, "failed")) == (2, 2)


async def test_gives_up_after_the_last_attempt_and_goes_on(
    database_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """An event refused max_attempts times is given up (logged, counted); the next one goes out."""
    await migrate.upgrade(database_url)
    settings = make_settings(database_url, tmp_path, **FAST, webhook_max_attempts=3)
    receiver = Receiver(script=[503, 503, 503])
    azure.post(HOOK).mock(side_effect=receiver)
    azure.post(TOKEN_URL_V1).respond(401, json=BAD_CLIENT)
    async with run_app(settings) as running:
        for _ in range(2):
            account = await create(running)
            r = await running.client.get(f"/accounts/{account['id']}/token", headers=client())
            assert r.json()["code"] == "invalid_credentials"
        await receiver.wait(4)
        await drained(settings)
        assert len(receiver.requests) == 4
        assert (delivered_count(running, "gave_up"), delivered_count(running)) == (1, 1)
        last = verified(receiver.requests[-1])
        assert (last["account_id"], last["to"]) == (account["id"], "invalid_credentials")
        assert CLIENT_SECRET not in last["message"]


async def test_redirects_are_not_followed(
    database_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """A 307 from the endpoint is a failed attempt; its Location is never called."""
    await migrate.upgrade(database_url)
    settings = make_settings(database_url, tmp_path, **FAST, webhook_max_attempts=2)
    elsewhere = azure.post("https://elsewhere.example/steal").respond(200)
    hook = azure.post(HOOK).respond(307, headers={"Location": "https://elsewhere.example/steal"})
    azure.post(TOKEN_URL_V1).respond(400, json=EXPIRED_GRANT)
    async with run_app(settings) as running:
        account = await create(running)
        await running.client.get(f"/accounts/{account['id']}/token", headers=client())
        await drained(settings)
        assert hook.call_count == 2
        assert not elsewhere.called
        assert delivered_count(running, "gave_up") == 1


async def test_first_start_begins_at_the_newest_event(
    database_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """Changes from before the webhook was configured are not sent; later ones are."""
    await migrate.upgrade(database_url)
    azure.post(TOKEN_URL_V1).respond(400, json=EXPIRED_GRANT)
    plain = make_settings(database_url, tmp_path)
    async with run_app(plain) as running:
        old = await create(running)
        assert (await running.client.get(f"/accounts/{old['id']}/token", headers=client())).status_code == 409
    assert CURSOR not in await leases(plain)
    receiver = Receiver()
    azure.post(HOOK).mock(side_effect=receiver)
    settings = make_settings(database_url, tmp_path, **FAST)
    async with run_app(settings) as running:
        new = await create(running)
        assert (await running.client.get(f"/accounts/{new['id']}/token", headers=client())).status_code == 409
        await receiver.wait(1)
        await drained(settings)
    assert [doc["account_id"] for doc in receiver.delivered()] == [new["id"]]


async def test_stopping_hands_the_lease_on(
    hook_settings: Settings, run_app: Callable[[Settings], Any], receiver: Receiver
) -> None:
    """While running the replica holds the lease; once it has stopped the lease has expired."""
    async with run_app(hook_settings) as running:
        await drained(hook_settings)
        holder, expires = (await leases(hook_settings))[LEASE]
        assert holder == running.ctx.notifier.holder
        assert expires > timeutil.utcnow()
    _, expires = (await leases(hook_settings))[LEASE]
    assert expires <= timeutil.utcnow()
    assert receiver.requests == []


@pytest.mark.mysql
async def test_two_replicas_deliver_each_event_exactly_once(
    mysql_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """Two apps on one MariaDB: every status change reaches the endpoint once, in event order."""
    await migrate.upgrade(mysql_url)
    settings = make_settings(mysql_url, tmp_path, **FAST)
    receiver = Receiver()
    azure.post(HOOK).mock(side_effect=receiver)
    azure.post(TOKEN_URL_V1).mock(
        side_effect=lambda request: (
            httpx.Response(400, json=EXPIRED_GRANT)
            if b"refresh_token=" + REFRESH_TOKEN.encode() in request.content
            else httpx.Response(200, json=v1_token("at-1", "rt-2"))
        )
    )
    async with run_app(settings) as one, run_app(settings) as two:
        accounts = [await create(one if i % 2 else two) for i in range(6)]
        for i, account in enumerate(accounts):
            replica = (one, two)[i % 2]
            path = f"/accounts/{account['id']}"
            assert (await replica.client.get(f"{path}/token", headers=client())).status_code == 409
            patched = await (two, one)[i % 2].client.patch(
                path, json={"refresh_token": f"fresh-{i}"}, headers=admin()
            )
            assert patched.status_code == 200
        await receiver.wait(12)
        await drained(settings)
        await asyncio.sleep(0.3)  # several more rounds of both loops: nothing is sent again
        delivered = [verified(r) for r in receiver.requests]
        ids = [doc["id"] for doc in delivered]
        assert len(ids) == 12
        assert ids == sorted(set(ids))
        assert delivered_count(one) + delivered_count(two) == 12
        by_account = {a["id"]: [d["to"] for d in delivered if d["account_id"] == a["id"]] for a in accounts}
        assert all(seq == ["needs_authorization", "ready"] for seq in by_account.values())


# -- the outbox, driven by hand ---------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def notifier_on_mysql(mysql_url: str, tmp_path: Path) -> AsyncIterator[tuple[Notifier, Any, Clock]]:
    await migrate.upgrade(mysql_url)
    settings = make_settings(mysql_url, tmp_path, **{**FAST, "webhook_gap_grace_seconds": 30.0})
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    clock = Clock()
    async with httpx.AsyncClient() as http:
        notifier = Notifier(
            url=HOOK, sessions=sessions, http=http, settings=settings, metrics=Metrics(), clock=clock
        )
        await notifier.prime()
        yield notifier, sessions, clock
    await engine.dispose()


async def add_status_event(session: Any, account_id: str) -> None:
    detail = {"from": "ready", "to": "failing", "code": "server_error"}
    await accounts_repo.add_event(session, account_id=account_id, kind="status_changed", detail=detail)
    await session.flush()


@pytest.mark.mysql
async def test_an_event_committed_late_is_not_skipped(
    notifier_on_mysql: tuple[Notifier, Any, Clock], receiver: Receiver
) -> None:
    """An id still uncommitted when a later one is visible holds the queue until it commits."""
    notifier, sessions, _ = notifier_on_mysql
    async with sessions() as slow:
        await add_status_event(slow, "acct-early")  # takes its id now, commits later
        async with sessions() as fast, fast.begin():
            await add_status_event(fast, "acct-late")
        assert await notifier.run_once() == 0
        assert receiver.requests == []
        await slow.commit()
    assert await notifier.run_once() == 2
    assert [json.loads(r.content)["account_id"] for r in receiver.requests] == ["acct-early", "acct-late"]


@pytest.mark.mysql
async def test_a_gap_that_never_fills_is_passed_after_the_grace(
    notifier_on_mysql: tuple[Notifier, Any, Clock], receiver: Receiver
) -> None:
    """A rolled-back insert leaves a gap: the queue waits the grace period, then goes on."""
    notifier, sessions, clock = notifier_on_mysql
    async with sessions() as rolled_back:
        await add_status_event(rolled_back, "acct-gone")
        await rolled_back.rollback()
    async with sessions() as session, session.begin():
        await add_status_event(session, "acct-after")
    assert await notifier.run_once() == 0
    clock.now += 29
    assert await notifier.run_once() == 0
    clock.now += 2
    assert await notifier.run_once() == 1
    assert [json.loads(r.content)["account_id"] for r in receiver.requests] == ["acct-after"]


# -- the URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allow_http", "why"),
    [
        ("http://hooks.example.internal/broker", False, "must use https"),
        ("https://user:pw@hooks.example.internal/broker", False, "user name or password"),
        ("https://hooks.example.internal/broker#x", False, "fragment"),
        ("https:///broker", False, "has no host"),
        ("https://hooks.example.internal/a b", False, "spaces"),
    ],
)
def test_a_bad_webhook_url_refuses_start_up(url: str, allow_http: bool, why: str, tmp_path: Path) -> None:
    """The webhook URL follows the outbound rules; the refusal names the setting, not the URL."""
    settings = make_settings(
        "sqlite+aiosqlite://", tmp_path, **{**FAST, "webhook_url": url}, allow_http=allow_http
    )
    with pytest.raises(ConfigurationError, match=why) as caught:
        check_url(settings)
    assert "BROKER_WEBHOOK_URL" in str(caught.value)
    assert url not in str(caught.value)


def test_an_internal_host_needs_no_allowed_hosts_entry(tmp_path: Path) -> None:
    """Any host passes (BROKER_ALLOWED_HOSTS is for Microsoft's hosts); http only when allowed."""
    assert check_url(make_settings("sqlite+aiosqlite://", tmp_path, **FAST)) == HOOK
    url = "http://10.0.0.7:8080/hook"
    assert check_url(
        make_settings("sqlite+aiosqlite://", tmp_path, **{**FAST, "webhook_url": url}, allow_http=True)
    )
    assert check_url(make_settings("sqlite+aiosqlite://", tmp_path)) is None


async def test_without_a_webhook_nothing_runs(running: Any) -> None:
    """No BROKER_WEBHOOK_URL: no notifier, no lease, no cursor."""
    assert running.ctx.notifier is None
    assert not {LEASE, CURSOR} & set(await leases(running.settings))


def test_the_lease_outlives_rounds_with_a_slow_post(tmp_path: Path) -> None:
    """The lease lasts several rounds that each wait out a POST's timeout, and never under 15 s."""
    slow = make_settings("sqlite+aiosqlite://", tmp_path, **FAST, webhook_timeout_seconds=30)
    assert lease_ttl(slow) >= timedelta(seconds=3 * (30 + 0.05))
    quick = make_settings("sqlite+aiosqlite://", tmp_path, **FAST, webhook_timeout_seconds=1)
    assert lease_ttl(quick) == timedelta(seconds=15)


# -- credential expiry ------------------------------------------------------------------------------


async def test_expiry_notices_go_out_once_per_stage_with_a_fake_clock(
    hooked: Any, receiver: Receiver
) -> None:
    """With the scan's clock moved forward: account.credential_expiring at 30, 7 and 1 days before
    and account.credential_expired after, once each however often the scan runs; an account
    created 5 days before expiry gets the 7-day notice only; the gauge counts each stage."""
    start = timeutil.utcnow()
    expires = (start + timedelta(days=40)).replace(microsecond=0)
    account = await create(hooked, client_secret_expires_at=expires.isoformat() + "Z")
    background = hooked.ctx.background

    def gauge(within: str) -> float:
        value = hooked.ctx.metrics.registry.get_sample_value(
            "broker_credentials_expiring", {"within": within}
        )
        return float(value or 0.0)

    async def scan_at(days: float) -> int:
        background.clock = lambda: start + timedelta(days=days)
        sent: int = await background.credential_expiry_once()
        return sent

    assert await scan_at(0) == 0
    assert gauge("30d") == 0
    assert [await scan_at(11), await scan_at(11.5)] == [1, 0]
    assert (gauge("30d"), gauge("7d"), gauge("expired")) == (1, 0, 0)
    assert [await scan_at(34), await scan_at(34)] == [1, 0]
    assert (gauge("30d"), gauge("7d")) == (1, 1)
    assert await scan_at(39.5) == 1
    assert [await scan_at(41), await scan_at(60)] == [1, 0]
    assert (gauge("30d"), gauge("7d"), gauge("expired")) == (0, 0, 1)
    await receiver.wait(4)
    await drained(hooked.settings)
    docs = [verified(r, r.content and json.loads(r.content)["event"]) for r in receiver.requests]
    assert [(d["event"], d["within"]) for d in docs] == [
        ("account.credential_expiring", "30d"),
        ("account.credential_expiring", "7d"),
        ("account.credential_expiring", "1d"),
        ("account.credential_expired", None),
    ]
    assert {d["account_id"] for d in docs} == {account["id"]}
    assert {d["expires_at"] for d in docs} == {expires.isoformat() + "Z"}
    assert set(docs[0]) == {
        "event",
        "id",
        "account_id",
        "account_name",
        "credential_type",
        "expires_at",
        "within",
        "at",
    }
    late = await create(hooked, client_secret_expires_at=(start + timedelta(days=5)).isoformat() + "Z")
    assert await scan_at(0) == 1
    await receiver.wait(5)
    last = verified(receiver.requests[-1], "account.credential_expiring")
    assert (last["account_id"], last["within"]) == (late["id"], "7d")


def _shares_a_run(text: str, secret: str, run: int = 8) -> bool:
    low, sec = text.lower(), secret.lower()
    return any(sec[i : i + run] in low for i in range(len(sec) - run + 1))


@pytest.mark.parametrize(
    "echo",
    [
        CLIENT_SECRET.lower(),
        CLIENT_SECRET[:-1],
        CLIENT_SECRET.upper()[1:],
        CLIENT_SECRET.replace("~", "%7E"),
        f"xx{CLIENT_SECRET[2:-2]}yy",
    ],
)
async def test_an_altered_echo_of_the_secret_is_stored_and_sent_nowhere(
    echo: str, hooked: Any, azure: respx.MockRouter, receiver: Receiver
) -> None:
    """invalid_client echoing the secret lowercased, cut short or encoded: no 8-character run of it
    is in last_error, the events or the notification (issue 12, item 7)."""
    answer = {
        "error": "invalid_client",
        "error_description": f"AADSTS7000215: Invalid client secret provided: {echo}. Trace ID: 1",
        "error_codes": [7000215],
    }
    azure.post(TOKEN_URL_V1).respond(401, json=answer)
    account = await create(hooked)
    r = await hooked.client.get(f"/accounts/{account['id']}/token", headers=client())
    assert r.json()["code"] == "invalid_credentials"
    await receiver.wait(1)
    await drained(hooked.settings)
    [doc] = receiver.delivered()
    assert "Invalid client secret provided" in doc["message"]
    stored = await hooked.client.get(f"/accounts/{account['id']}", headers=admin())
    events = await hooked.client.get(f"/accounts/{account['id']}/events", headers=admin())
    assert stored.json()["last_error"]["code"] == "invalid_client"
    for where, text in (
        ("token response", r.text),
        ("webhook", receiver.requests[0].content.decode()),
        ("last_error", json.dumps(stored.json()["last_error"])),
        ("events", events.text),
    ):
        assert not _shares_a_run(text, CLIENT_SECRET), where
