"""Group commit: items submitted while batches run go together into the next batch.

Invariants:
* Every submitted item is handled exactly once, in a batch of at most ``max_size`` items, and its
  submitter gets that item's own result, or its own exception (the handler returns one per item,
  in order). A batch that fails as a whole fails each of its items with that exception.
* At most ``concurrency`` batches run at once. A lone item starts on the event loop's next turn:
  there is no timer, so batching costs no latency; it comes from items arriving in the same turn
  (callers woken together) and while batches run.
* A submitter that is cancelled does not cancel its batch (the other items' submitters wait for
  it); its item's result is dropped.
* ``max_size`` and ``concurrency`` bound what one batch holds (rows locked, a connection) and how
  many connections batches take from the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

Handler = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[T, R]):
    def __init__(self, handle: Handler[T, R], *, max_size: int, concurrency: int) -> None:
        if max_size < 1 or concurrency < 1:
            raise ValueError("max_size and concurrency must be at least 1")
        self._handle = handle
        self._max_size = max_size
        self._concurrency = concurrency
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._running: set[asyncio.Task[None]] = set()
        self._start_soon: asyncio.Handle | None = None
        self.batches = 0  # batches handled so far (a figure for tests and benchmarks)
        self.items = 0

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._start_soon is None:
            self._start_soon = asyncio.get_running_loop().call_soon(self._start)
        # The batch resolves the future; shielding it keeps a cancelled submitter from marking
        # the shared work cancelled (the batch still runs and sees a done future: dropped).
        return await asyncio.shield(future)

    async def drain(self) -> None:
        """Return once no batch runs or waits (at shutdown: the answers being stored are kept)."""
        await asyncio.sleep(0)  # a start scheduled for this turn goes first
        while self._running:
            await asyncio.wait(set(self._running))

    def _start(self) -> None:
        self._start_soon = None
        while self._queue and len(self._running) < self._concurrency:
            size = min(self._max_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(size)]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = await self._handle([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch handler returned {len(results)} results for {len(batch)} items")
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter of the batch hears of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
                    future.exception()  # a waiter that left must not leave it unretrieved
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
                future.exception()
            else:
                future.set_result(result)
