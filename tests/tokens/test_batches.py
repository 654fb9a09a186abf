"""Refreshes in batches (SQLite and MariaDB): a cold wave costs a few transactions, not a few per
account; a row another transaction holds is claimed alone while the batch goes on; a batch the
database fails is stored one answer at a time; an account twice in a batch is decided once."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import respx
from sqlalchemy import select

from service.errors import StorageUnavailable
from service.models import AccountState
from service.settings import Settings
from service.tokens.claiming import Ask
from service.tokens.claims import UNREAD, Claim
from service.tokens.steps import SKIPPED
from service.tokens.storing import Landing
from tests.conftest import TOKEN_URL_V1, sql_statements, v1_token
from tests.tokens.test_tokens import create, form, stored_refresh_token


class Rotating:
    """Azure answering each refresh token ``rt-X`` with ``at-X`` and a rotated ``rt-X+``, every
    answer held until ``release`` is set (None: at once)."""

    def __init__(self, release: asyncio.Event | None = None) -> None:
        self.release = release
        self.arrived = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.arrived += 1
        if self.release is not None:
            await self.release.wait()
        old = form(request)["refresh_token"]
        return httpx.Response(200, json=v1_token(f"at-{old}", f"{old}+"))


async def accounts(running: Any, count: int) -> list[str]:
    return [await create(running, refresh_token=f"rt-{i}") for i in range(count)]


async def warm(running: Any, azure: respx.MockRouter) -> None:
    """One refresh first: the replica lock is then held (MySQL), so a wave starts in one turn."""
    await running.ctx.broker.get_token(await create(running, refresh_token="rt-warm"))


async def held_wave(running: Any, azure: respx.MockRouter, count: int) -> tuple[list[str], Rotating]:
    """``count`` cold accounts (``rt-0``...), after a warm-up; Azure then holds its answers until
    the returned ``Rotating``'s ``release`` is set."""
    azure.post(TOKEN_URL_V1).mock(side_effect=Rotating())
    await warm(running, azure)
    ids = await accounts(running, count)
    answers = Rotating(asyncio.Event())
    azure.post(TOKEN_URL_V1).mock(side_effect=answers)
    return ids, answers


async def test_a_cold_wave_is_claimed_and_stored_in_a_few_transactions(
    running: Any, azure: respx.MockRouter
) -> None:
    ids, answers = await held_wave(running, azure, 30)
    refresher = running.ctx.broker._refresher
    claims, stores = refresher.claims.batches, refresher.stores.batches
    with sql_statements(running) as statements:
        waiters = [asyncio.create_task(running.ctx.broker.get_token(i)) for i in ids]
        while answers.arrived < len(ids):
            await asyncio.sleep(0.001)
        assert refresher.claims.batches - claims <= 3  # the wave arrived in one turn: one batch
        answers.release.set()
        tokens = await asyncio.gather(*waiters)
    assert [t.access_token for t in tokens] == [f"at-rt-{i}" for i in range(30)]
    assert refresher.stores.batches - stores <= 3
    assert [await stored_refresh_token(running, i) for i in ids] == [f"rt-{i}+" for i in range(30)]
    commits = [s for s in statements if s.strip().upper().startswith("COMMIT")]
    # One account at a time took two transactions and about fifteen statements per account.
    assert len(statements) < 5 * len(ids), statements[:40]
    assert len(commits) <= 6


async def test_a_store_batch_the_database_fails_is_stored_one_answer_at_a_time(
    running: Any, azure: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids, answers = await held_wave(running, azure, 8)
    step = running.ctx.broker._refresher.store_step
    real_run = step._run
    failed: list[int] = []

    async def fail_batches(landings: list[Landing], *, skip_locked: bool) -> Any:
        if skip_locked and len(landings) > 1:
            failed.append(len(landings))
            raise StorageUnavailable("The database cannot be reached.", reason="database")
        return await real_run(landings, skip_locked=skip_locked)

    monkeypatch.setattr(step, "_run", fail_batches)
    waiters = [asyncio.create_task(running.ctx.broker.get_token(i)) for i in ids]
    while answers.arrived < len(ids):
        await asyncio.sleep(0.001)
    answers.release.set()
    tokens = await asyncio.gather(*waiters)
    assert failed
    assert max(failed) > 1
    assert [t.access_token for t in tokens] == [f"at-rt-{i}" for i in range(8)]
    # Each answer was then stored alone: no rotated refresh token was lost.
    assert [await stored_refresh_token(running, i) for i in ids] == [f"rt-{i}+" for i in range(8)]
    assert running.ctx.metrics.refresh_token_unsaved._value.get() == 0


async def test_an_account_twice_in_one_batch_is_decided_once(running: Any) -> None:
    account_id = await create(running, refresh_token="rt-twice")
    await running.ctx.broker.liveness.ready(5)
    ask = Ask(account_id, 300, UNREAD, None)
    first, second = await running.ctx.broker._refresher.claim_step([ask, ask])
    assert isinstance(first, Claim)
    assert second is SKIPPED  # decided alone afterwards, when it will see the first one's claim


@pytest.mark.mysql
async def test_a_locked_row_is_claimed_alone_while_the_rest_of_the_batch_goes_on(
    mysql_settings: Settings, run_app: Any, azure: respx.MockRouter
) -> None:
    """MariaDB (SQLite has no row locks): an account whose token row another transaction holds
    does not hold up the others in its batch; it is refreshed once the lock is released."""
    azure.post(TOKEN_URL_V1).mock(side_effect=Rotating())
    async with run_app(mysql_settings) as running:
        await warm(running, azure)
        locked, *others = await accounts(running, 5)
        async with running.ctx.engine.connect() as blocker:
            await blocker.execute(
                select(AccountState.account_id).where(AccountState.account_id == locked).with_for_update()
            )
            waiting = asyncio.create_task(running.ctx.broker.get_token(locked))
            rest = [asyncio.create_task(running.ctx.broker.get_token(i)) for i in others]
            done, _ = await asyncio.wait(rest, timeout=10)
            assert done == set(rest)  # the others did not wait for the locked row
            assert not waiting.done()  # the locked one waits for the lock, alone
            await blocker.rollback()
        assert (await asyncio.wait_for(waiting, 10)).access_token == "at-rt-0"
        assert await stored_refresh_token(running, locked) == "rt-0+"
