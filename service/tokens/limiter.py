"""How many refreshes this process runs at once.

Invariants:
* At most ``slots`` refreshes (``BROKER_MAX_CONCURRENT_REFRESHES``) are claiming or at Azure at
  once. None holds a database connection while Azure answers (refresh.py), so the limit is
  independent of the pool: it bounds outbound calls, and the memory and CPU they cost.
* Background refreshes (of tokens still being served) start only while fewer than
  ``background_slots`` refreshes run, so callers with no usable token are not queued behind them.
  The check and the taking of a slot happen with no await in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RefreshLimiter:
    def __init__(self, slots: int, background_slots: int) -> None:
        self.slots = slots
        self.background_slots = background_slots
        self._semaphore = asyncio.Semaphore(slots)
        self._running = 0

    @classmethod
    def for_slots(cls, slots: int) -> RefreshLimiter:
        """``slots`` in all; background refreshes leave an eighth of them (at least one) free."""
        return cls(slots, max(1, slots - max(1, slots // 8)) if slots > 1 else 1)

    @property
    def running(self) -> int:
        """Refreshes holding a slot now."""
        return self._running

    def background_full(self) -> bool:
        return self._running >= self.background_slots

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._semaphore:
            self._running += 1
            try:
                yield
            finally:
                self._running -= 1
