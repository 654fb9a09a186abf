"""A first-in, first-out concurrency limiter with a bounded wait.

Invariant: at most ``capacity`` holders at once; a freed place goes to the longest waiter still
waiting (a waiter that timed out or was cancelled is skipped, and a place handed to a waiter that
is cancelled at that very moment is passed on, never lost). No clock of its own: the wait is
bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FifoLimiter:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._free = capacity
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def holders(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @property
    def idle(self) -> bool:
        return self._free == self.capacity and not self._waiters

    async def acquire(self, within: float) -> None:
        """Take a place, waiting at most ``within`` seconds (``TimeoutError`` after that)."""
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if within <= 0:
            raise TimeoutError
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the place arrived as we gave up: hand it on
            else:
                waiter.cancel()
                self._prune()
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place goes straight to it: _free stays as it is
                return
        self._free = min(self.capacity, self._free + 1)

    def _prune(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()
