"""Refresh claims under races: two brokers in this process over one MariaDB database, each with
its own replica lock, racing for the same account; a claim expiring; an owner dying between
Azure's answer and the store; a store arriving after its claim was taken over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from service import migrate
from service.accounts import repository as accounts_repo
from service.errors import UpstreamUnavailable
from service.kit import timeutil
from service.models import AccountState
from service.settings import Settings
from tests.conftest import TOKEN_URL_V1, make_settings, v1_token
from tests.tokens.test_tokens import Held, create, form, stored_refresh_token

pytestmark = pytest.mark.mysql


@asynccontextmanager
async def two_replicas(
    settings: Settings, run_app: Callable[[Settings], Any]
) -> AsyncIterator[tuple[Any, Any]]:
    async with run_app(settings) as one, run_app(settings) as two:
        yield one, two


class InOrder:
    """Azure answering each request with the next Held in order of arrival."""

    def __init__(self, *helds: Held) -> None:
        self.helds = list(helds)
        self.calls: list[dict[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        held = self.helds[len(self.calls)]
        self.calls.append(form(request))
        return await held(request)


async def claim_of(running: Any, account_id: str) -> tuple[str | None, str | None]:
    async with running.ctx.sessions() as session:
        state = await session.get(AccountState, account_id, populate_existing=True)
        assert state is not None
        return state.refresh_claim_owner, state.refresh_claim_id


async def expire_claim(running: Any, account_id: str) -> None:
    async with running.ctx.sessions() as session:
        past = timeutil.utcnow() - timedelta(seconds=1)
        await accounts_repo.update_state(session, account_id, {"refresh_claim_expires_at": past})
        await session.commit()


async def test_two_replicas_racing_call_azure_once(
    mysql_settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """Both replicas want the same cold account at once: one claims and calls Azure, the other
    waits for the claim and serves what was stored. One Azure call; the rotated refresh token is
    stored, and the claim is gone afterwards."""
    held = Held(httpx.Response(200, json=v1_token("the-one", "rt-rotated")))
    route = azure.post(TOKEN_URL_V1).mock(side_effect=held)
    async with two_replicas(mysql_settings, run_app) as (one, two):
        account_id = await create(one)
        first = asyncio.create_task(one.ctx.broker.get_token(account_id))
        await held.until_arrived()
        owner, _ = await claim_of(one, account_id)
        assert owner == one.ctx.broker.liveness.replica_id
        second = asyncio.create_task(two.ctx.broker.get_token(account_id))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not second.done()  # waiting for the live claim, not at Azure
        assert held.arrived == 1
        held.release.set()
        tokens = await asyncio.gather(first, second)
        assert [t.access_token for t in tokens] == ["the-one", "the-one"]
        assert route.call_count == 1
        assert await stored_refresh_token(one, account_id) == "rt-rotated"
        assert await claim_of(one, account_id) == (None, None)


async def test_an_expired_claim_of_a_live_replica_is_taken_over(
    mysql_settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """A claim past its expiry is taken over even though its owner still lives (its Azure call
    outlived every timeout); the owner's late answer then does not overwrite the newer result."""
    slow = Held(httpx.Response(200, json=v1_token("late", "rt-late")))
    quick = Held(httpx.Response(200, json=v1_token("taker", "rt-taker")))
    quick.release.set()
    answers = InOrder(slow, quick)
    azure.post(TOKEN_URL_V1).mock(side_effect=answers)
    async with two_replicas(mysql_settings, run_app) as (one, two):
        account_id = await create(one)
        first = asyncio.create_task(one.ctx.broker.get_token(account_id))
        await slow.until_arrived()
        await expire_claim(one, account_id)
        taken = await two.ctx.broker.get_token(account_id)
        assert taken.access_token == "taker"
        assert (await claim_of(two, account_id)) == (None, None)  # the taker's claim, cleared
        slow.release.set()
        late = await first
        assert late.access_token == "taker"  # the stored, newer result is served
        assert await stored_refresh_token(one, account_id) == "rt-taker"
        assert len(answers.calls) == 2


async def test_a_live_unexpired_claim_is_waited_for_within_the_lock_wait(
    mysql_url: str, tmp_path: Path, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """While a live replica's claim holds (and has not expired), a caller elsewhere waits, with
    no connection held, at most BROKER_LOCK_WAIT_SECONDS, then gets 503 lock_timeout; Azure is
    not asked. (A claim expires after the same time, so in practice the waiter takes it over.)"""
    await migrate.upgrade(mysql_url)
    settings = make_settings(mysql_url, tmp_path, idp_timeout_seconds=1, lock_wait_seconds=2)
    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token("never", "rt-never"))
    async with two_replicas(settings, run_app) as (one, two):
        account_id = await create(one)
        await one.ctx.broker.liveness.ready(5)  # one's replica lock is held: one lives
        async with one.ctx.sessions() as session:
            claim = {
                "refresh_claim_owner": one.ctx.broker.liveness.replica_id,
                "refresh_claim_id": "a-live-claim",
                "refresh_claim_expires_at": timeutil.utcnow() + timedelta(seconds=60),
            }
            await accounts_repo.update_state(session, account_id, claim)
            await session.commit()
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailable) as raised:
            await two.ctx.broker.get_token(account_id)
        waited = time.monotonic() - started
        assert raised.value.reason == "lock_timeout"
        assert 1.5 <= waited <= 4
        assert route.call_count == 0
        assert two.ctx.engine.pool.checkedout() <= 1  # the replica lock's connection alone


async def test_owner_killed_between_azures_answer_and_the_store(
    mysql_settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """The owner dies after Azure answered but before it stored (its replica lock goes with it):
    the other replica takes the claim over at once (well within a second), with the refresh token
    still stored (Azure semantics: it stays valid), and stores its own result."""
    asked: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        asked.append(form(request)["refresh_token"])
        if len(asked) == 1:
            # Azure has answered; the owner dies now: its lock connection closes, nothing stored.
            await one.ctx.broker.liveness.close()
            raise asyncio.CancelledError
        return httpx.Response(200, json=v1_token("after-kill", "rt-after"))

    azure.post(TOKEN_URL_V1).mock(side_effect=answer)
    async with two_replicas(mysql_settings, run_app) as (one, two):
        account_id = await create(one)
        with pytest.raises(asyncio.CancelledError):
            await one.ctx.broker.get_token(account_id)
        owner, _ = await claim_of(two, account_id)
        assert owner == one.ctx.broker.liveness.replica_id  # the dead owner's claim is still there
        started = time.monotonic()
        token = await two.ctx.broker.get_token(account_id)
        assert time.monotonic() - started < 1.0
        assert token.access_token == "after-kill"
        assert len(asked) == 2
        assert asked[0] == asked[1]  # the refresh token the dead owner redeemed, still stored
        assert await stored_refresh_token(two, account_id) == "rt-after"


async def test_a_late_store_after_takeover_keeps_the_newest_refresh_token(
    mysql_settings: Settings, run_app: Callable[[Settings], Any], azure: respx.MockRouter
) -> None:
    """The first owner's answer arrives after its claim was taken over but before the taker
    stored: it is the newest, so it is stored (its rotated refresh token is not lost); the taker's
    later answer does not overwrite it, and the taker serves the stored token."""
    first_answer = Held(httpx.Response(200, json=v1_token("first", "rt-first")))
    taker_answer = Held(httpx.Response(200, json=v1_token("taker", "rt-taker")))
    answers = InOrder(first_answer, taker_answer)
    azure.post(TOKEN_URL_V1).mock(side_effect=answers)
    async with two_replicas(mysql_settings, run_app) as (one, two):
        account_id = await create(one)
        first = asyncio.create_task(one.ctx.broker.get_token(account_id))
        await first_answer.until_arrived()
        await expire_claim(one, account_id)
        taker = asyncio.create_task(two.ctx.broker.get_token(account_id))
        await taker_answer.until_arrived()
        owner, _ = await claim_of(one, account_id)
        assert owner == two.ctx.broker.liveness.replica_id
        first_answer.release.set()
        assert (await first).access_token == "first"
        assert await stored_refresh_token(one, account_id) == "rt-first"
        assert (await claim_of(one, account_id))[0] == two.ctx.broker.liveness.replica_id  # still the taker's
        taker_answer.release.set()
        assert (await taker).access_token == "first"
        assert await stored_refresh_token(one, account_id) == "rt-first"
        assert await claim_of(one, account_id) == (None, None)
