"""Pacing on one replica: the FIFO limiter, the pause book, and the pacer over both (fake clock)."""

from __future__ import annotations

import asyncio

import pytest

from service.errors import Throttled
from service.proxy.limiter import FifoLimiter
from service.proxy.pacing import Pacer, retry_after_seconds
from service.proxy.pauses import PauseBook


class FakeClock:
    """Time moves only when someone sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# -- the limiter ------------------------------------------------------------------------------------


async def test_the_limiter_admits_capacity_and_hands_places_on_in_arrival_order() -> None:
    """Three places, ten callers: three at once, the rest in the order they came."""
    limiter = FifoLimiter(3)
    order: list[int] = []
    release = [asyncio.Event() for _ in range(10)]

    async def caller(i: int) -> None:
        await limiter.acquire(60)
        order.append(i)
        await release[i].wait()
        limiter.release()

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(caller(i)))
        await settle()
    assert order == [0, 1, 2]
    assert limiter.holders == 3
    assert limiter.waiting == 7
    for i in range(10):
        release[i].set()
        await settle()
        assert limiter.holders <= 3
    await asyncio.gather(*tasks)
    assert order == list(range(10))
    assert limiter.idle


async def test_a_waiter_that_times_out_or_is_cancelled_loses_no_place() -> None:
    """Timed-out and cancelled waiters are skipped; the place goes to the next one, capacity intact."""
    limiter = FifoLimiter(1)
    await limiter.acquire(1)
    with pytest.raises(TimeoutError):
        await limiter.acquire(0.01)
    with pytest.raises(TimeoutError):
        await limiter.acquire(0)
    cancelled = asyncio.create_task(limiter.acquire(60))
    waiting = asyncio.create_task(limiter.acquire(60))
    await settle()
    cancelled.cancel()
    await settle()
    limiter.release()
    await asyncio.wait_for(waiting, 1)
    assert cancelled.cancelled()
    assert limiter.holders == 1
    limiter.release()
    assert limiter.idle


async def test_a_place_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    """Release, then cancel the waiter before it runs: the next waiter gets the place."""
    limiter = FifoLimiter(1)
    await limiter.acquire(1)
    first = asyncio.create_task(limiter.acquire(60))
    second = asyncio.create_task(limiter.acquire(60))
    await settle()
    limiter.release()  # the place is now first's future result
    first.cancel()
    await settle()
    await asyncio.wait_for(second, 1)
    assert limiter.holders == 1


# -- the pause book ---------------------------------------------------------------------------------


def test_a_pause_only_ever_moves_forward() -> None:
    """An earlier or past `until` changes nothing; a later one extends; expired pauses vanish."""
    clock = FakeClock()
    book = PauseBook(clock)
    assert book.extend("a", clock.now + 5)
    assert not book.extend("a", clock.now + 3)
    assert not book.extend("b", clock.now - 1)
    assert book.remaining("a") == 5
    book.merge([("a", clock.now + 8), ("b", clock.now + 2)])
    assert book.remaining("a") == 8
    assert book.active_count() == 2
    clock.now += 2
    assert book.active_count() == 1
    clock.now += 6
    assert book.remaining("a") == 0
    assert book.active_count() == 0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), (" 2 ", 2.0), ("0.5", 0.5), ("99999", 3600.0), ("-3", 0.0), ("soon", None), (None, None),
     ("Thu, 01 Jan 1970 00:00:10 GMT", 10.0), ("nan", None)],
)  # fmt: skip
def test_retry_after_reads_seconds_and_http_dates(header: str | None, seconds: float | None) -> None:
    """Delta-seconds and HTTP dates, capped at an hour; unreadable values are ignored."""
    assert retry_after_seconds(header, now=0.0) == seconds


# -- the pacer --------------------------------------------------------------------------------------


def pacer(clock: FakeClock, capacity: int = 2, max_wait: float = 10) -> Pacer:
    return Pacer(capacity=capacity, max_wait=max_wait, pauses=PauseBook(clock), sleep=clock.sleep)


async def test_a_pause_longer_than_the_bound_is_429_at_once_with_the_remaining_wait() -> None:
    """Paused for 30 s with a 10 s bound: 429 Retry-After 30 without waiting or queueing."""
    clock = FakeClock()
    p = pacer(clock)
    p.pauses.extend("a", clock.now + 29.2)
    with pytest.raises(Throttled) as caught:
        await p.acquire("a")
    assert caught.value.headers["Retry-After"] == "30"
    assert caught.value.reason == "upstream_pause"
    assert clock.sleeps == []
    assert p.in_flight("a") == 0
    slot = await p.acquire("b")  # other accounts are not held back
    slot.release()


async def test_a_pause_shorter_than_the_bound_is_waited_out_then_sent() -> None:
    """Paused for 4 s: the caller waits the 4 s (holding its place) and goes on; the wait is reported."""
    clock = FakeClock()
    p = pacer(clock)
    p.pauses.extend("a", clock.now + 4)
    slot = await p.acquire("a")
    assert clock.sleeps == [4]
    assert slot.waited == 4
    assert p.pauses.remaining("a") == 0
    slot.release()
    assert p.in_flight("a") == 0


async def test_a_pause_extended_while_waiting_beyond_the_bound_becomes_429() -> None:
    """Waiting out 4 s, the pause moves 20 s further: the caller gets 429 and its place is freed."""
    clock = FakeClock()
    p = pacer(clock)
    p.pauses.extend("a", clock.now + 4)
    real_sleep = clock.sleep

    async def extending_sleep(seconds: float) -> None:
        p.pauses.extend("a", clock.now + 24)
        await real_sleep(seconds)

    p._sleep = extending_sleep
    with pytest.raises(Throttled) as caught:
        await p.acquire("a")
    assert int(caught.value.headers["Retry-After"]) == 20
    assert p.in_flight("a") == 0


async def test_a_caller_who_holds_a_place_checks_a_pause_that_began_while_it_queued() -> None:
    """Queued behind a request, then the account is paused: the caller waits out the pause before sending."""
    clock = FakeClock()
    p = pacer(clock, capacity=1)
    first = await p.acquire("a")
    second = asyncio.create_task(p.acquire("a"))
    await settle()
    assert not second.done()
    p.pauses.extend("a", clock.now + 3)  # the first request came back 429 Retry-After 3
    first.release()
    slot = await asyncio.wait_for(second, 1)
    assert clock.sleeps == [3]
    assert p.pauses.remaining("a") == 0
    slot.release()


async def test_callers_beyond_capacity_get_429_after_the_bound() -> None:
    """Two places, held: a third caller waits max_wait, then 429 throttled (queue_full)."""
    clock = FakeClock()
    p = pacer(clock, capacity=2, max_wait=0.05)
    held = [await p.acquire("a"), await p.acquire("a")]
    with pytest.raises(Throttled) as caught:
        await p.acquire("a")
    assert caught.value.reason == "queue_full"
    assert caught.value.headers["Retry-After"] == "1"
    assert p.in_flight("a") == 2
    for slot in held:
        slot.release()
        slot.release()  # idempotent
    assert p.in_flight("a") == 0


# -- the pause sync ---------------------------------------------------------------------------------


class _SlowSessions:
    """A session factory whose queries never answer (a database that hangs)."""

    def __init__(self, started: asyncio.Event) -> None:
        self.started = started

    def __call__(self) -> _SlowSessions:
        return self

    async def __aenter__(self) -> _SlowSessions:
        self.started.set()
        await asyncio.Event().wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_an_idle_replica_reads_pauses_first_but_a_hung_database_does_not_hold_callers() -> None:
    """fresh() on a replica that has not polled waits at most READ_TIMEOUT_SECONDS for the database."""
    from service.proxy import pauses

    started = asyncio.Event()
    sync = pauses.PauseSync(PauseBook(FakeClock()), _SlowSessions(started), interval=1.0)  # type: ignore[arg-type]
    original = pauses.READ_TIMEOUT_SECONDS
    pauses.READ_TIMEOUT_SECONDS = 0.05
    try:
        await asyncio.wait_for(sync.fresh(), 2)
    finally:
        pauses.READ_TIMEOUT_SECONDS = original
    assert started.is_set()  # it did try the database
    assert sync._polling is not None
    sync._polling.cancel()
