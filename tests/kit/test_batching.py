"""The group-commit unit on its own: who goes in which batch, what each submitter gets back."""

from __future__ import annotations

import asyncio

import pytest

from service.kit.batching import Batcher


class Handler:
    """Records each batch; a batch waits for ``gate`` when one is set; ``-n`` fails item n."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int | BaseException]:
        self.batches.append(items)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return [ValueError(f"item {i}") if i < 0 else i * 10 for i in items]
        finally:
            self.running -= 1


async def test_a_lone_item_is_handled_at_once_on_its_own() -> None:
    handler = Handler()
    batcher = Batcher(handler, max_size=10, concurrency=2)
    assert await batcher.submit(3) == 30
    assert handler.batches == [[3]]


async def test_items_arriving_together_or_while_a_batch_runs_share_the_next_batch() -> None:
    handler = Handler()
    handler.gate = asyncio.Event()
    batcher = Batcher(handler, max_size=10, concurrency=1)
    together = [asyncio.create_task(batcher.submit(i)) for i in (1, 2, 3)]
    await handler.entered.wait()
    assert handler.batches == [[1, 2, 3]]  # submitted in one turn of the loop: one batch
    later = [asyncio.create_task(batcher.submit(i)) for i in (4, 5)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert batcher.queued == 2  # the only batch slot is busy: they wait, together
    handler.gate.set()
    assert await asyncio.gather(*together, *later) == [10, 20, 30, 40, 50]
    assert handler.batches == [[1, 2, 3], [4, 5]]
    assert (batcher.batches, batcher.items) == (2, 5)


async def test_batches_are_at_most_max_size_and_at_most_concurrency_run_at_once() -> None:
    handler = Handler()
    handler.gate = asyncio.Event()
    batcher = Batcher(handler, max_size=3, concurrency=2)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in range(8)]
    while len(handler.batches) < 2:
        await asyncio.sleep(0)
    assert handler.batches == [[0, 1, 2], [3, 4, 5]]
    assert batcher.running == 2
    assert batcher.queued == 2
    handler.gate.set()
    assert await asyncio.gather(*tasks) == [i * 10 for i in range(8)]
    assert handler.batches[2] == [6, 7]
    assert handler.most_running == 2


async def test_each_submitter_gets_its_own_items_exception_only() -> None:
    handler = Handler()
    batcher = Batcher(handler, max_size=10, concurrency=1)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-2), batcher.submit(3), return_exceptions=True
    )
    assert results[0] == 10
    assert results[2] == 30
    assert isinstance(results[1], ValueError)
    assert str(results[1]) == "item -2"
    assert handler.batches == [[1, -2, 3]]


async def test_a_batch_failing_as_a_whole_fails_each_of_its_items() -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ConnectionError("database gone")

    batcher: Batcher[int, int] = Batcher(broken, max_size=10, concurrency=1)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)


async def test_a_handler_answering_the_wrong_number_of_results_fails_the_batch() -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher: Batcher[int, int] = Batcher(short, max_size=10, concurrency=1)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_a_cancelled_submitter_does_not_cancel_its_batch() -> None:
    handler = Handler()
    handler.gate = asyncio.Event()
    batcher = Batcher(handler, max_size=10, concurrency=1)
    leaving = asyncio.create_task(batcher.submit(1))
    staying = asyncio.create_task(batcher.submit(2))
    await handler.entered.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    handler.gate.set()
    assert await staying == 20
    assert handler.batches == [[1, 2]]  # the item that left was still handled; its result dropped


async def test_drain_returns_once_the_batches_under_way_have_ended() -> None:
    handler = Handler()
    handler.gate = asyncio.Event()
    batcher = Batcher(handler, max_size=1, concurrency=1)
    tasks = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    drained = asyncio.create_task(batcher.drain())
    await handler.entered.wait()
    await asyncio.sleep(0)
    assert not drained.done()  # the first batch is held; the second waits its turn
    handler.gate.set()
    await drained
    assert all(t.done() for t in tasks)
    assert handler.batches == [[1], [2]]


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(Handler(), max_size=0, concurrency=1)
