"""SingleFlight: one task per key, shared by every waiter (as aiohttp tests its resolver)."""

from __future__ import annotations

import asyncio

import pytest

from service.kit.singleflight import SingleFlight


class Gate:
    """Work that counts its runs and finishes (or fails) only when released."""

    def __init__(self, result: str = "value", error: Exception | None = None) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.runs = 0
        self.result = result
        self.error = error

    async def __call__(self) -> str:
        self.runs += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.result


async def test_concurrent_callers_share_one_run_and_its_result() -> None:
    """Callers asking for the same key while it runs get the one result; the work ran once."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    waiters = [asyncio.create_task(flights.run("a", gate)) for _ in range(5)]
    await gate.started.wait()
    assert "a" in flights
    assert len(flights) == 1
    gate.release.set()
    assert await asyncio.gather(*waiters) == ["value"] * 5
    assert gate.runs == 1


async def test_registered_before_any_await() -> None:
    """``start`` registers the task before it returns: a second start in the same step joins it."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    first = flights.start("a", gate)
    second = flights.start("a", gate)
    assert first is second
    gate.release.set()
    assert await first == "value"
    assert gate.runs == 1


async def test_first_waiter_cancelled_others_still_get_the_result() -> None:
    """Cancelling the caller that started the work cancels neither the work nor the other waiters."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    first = asyncio.create_task(flights.run("a", gate))
    await gate.started.wait()
    second = asyncio.create_task(flights.run("a", gate))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "a" in flights
    gate.release.set()
    assert await second == "value"
    assert gate.runs == 1


async def test_an_error_reaches_every_waiter_and_is_not_kept() -> None:
    """The work's exception is raised to each waiter; the next call runs the work again."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate(error=ValueError("boom"))
    waiters = [asyncio.create_task(flights.run("a", gate)) for _ in range(3)]
    await gate.started.wait()
    gate.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ValueError) for r in results)
    assert "a" not in flights
    again = Gate(result="second")
    again.release.set()
    assert await flights.run("a", again) == "second"


async def test_nothing_left_behind_and_callbacks_balance() -> None:
    """After success, failure and cancellation no key stays, and on_start/on_done pair up."""
    counts = {"started": 0, "done": 0}
    flights: SingleFlight[str, str] = SingleFlight(
        on_start=lambda: counts.__setitem__("started", counts["started"] + 1),
        on_done=lambda: counts.__setitem__("done", counts["done"] + 1),
    )
    ok, bad, hung = Gate(), Gate(error=RuntimeError("x")), Gate()
    ok.release.set()
    bad.release.set()
    await flights.run("ok", ok)
    with pytest.raises(RuntimeError):
        await flights.run("bad", bad)
    task = flights.start("hung", hung)
    await hung.started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(flights) == 0
    assert counts == {"started": 3, "done": 3}


async def test_different_keys_run_side_by_side() -> None:
    """Work for another key is not joined: each key has its own run."""
    flights: SingleFlight[str, str] = SingleFlight()
    a, b = Gate("A"), Gate("B")
    ta, tb = flights.start("a", a), flights.start("b", b)
    await asyncio.gather(a.started.wait(), b.started.wait())
    assert len(flights) == 2
    a.release.set()
    b.release.set()
    assert (await ta, await tb) == ("A", "B")


async def test_close_lets_work_finish_within_the_grace() -> None:
    """Work that ends within the grace period finishes normally on close."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    task = flights.start("a", gate)
    await gate.started.wait()
    closing = asyncio.create_task(flights.close(grace=30))
    await asyncio.sleep(0)
    assert not closing.done()
    gate.release.set()
    await closing
    assert await task == "value"


async def test_close_cancels_what_outlives_the_grace() -> None:
    """Work still running after the grace period is cancelled, and its waiters see that."""
    flights: SingleFlight[str, str] = SingleFlight()
    gate = Gate()
    waiter = asyncio.create_task(flights.run("a", gate))
    await gate.started.wait()
    await flights.close(grace=0)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(flights) == 0
