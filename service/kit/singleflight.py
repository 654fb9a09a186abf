"""One piece of work per key at a time, shared by every caller that asks for it meanwhile.

Invariants (aiohttp's ``_resolve_host`` pattern):
* The task is registered under its key before any await: a caller arriving after ``run`` or
  ``start`` returned control finds it and joins instead of starting another.
* Callers wait through ``asyncio.shield``: a caller that is cancelled (a client that went away)
  does not cancel the work the others wait for.
* Its result, or its exception, reaches every waiter; nothing is kept afterwards (the key is
  removed in the task's done callback, so a failure is never served to a later caller).
* ``close`` lets work in flight finish for a bounded time, then cancels what is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    def __init__(
        self, *, on_start: Callable[[], None] | None = None, on_done: Callable[[], None] | None = None
    ) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}
        self._on_start = on_start
        self._on_done = on_done

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> asyncio.Task[V]:
        """The task in flight for ``key``, or a new one running ``work()`` (called only then)."""
        task = self._tasks.get(key)
        if task is not None:
            return task
        task = asyncio.get_running_loop().create_task(work())
        # No await between creating and registering: nobody can start a second one meanwhile.
        self._tasks[key] = task
        if self._on_start is not None:
            self._on_start()

        def _done(t: asyncio.Task[V]) -> None:
            if self._tasks.get(key) is t:
                del self._tasks[key]
            if self._on_done is not None:
                self._on_done()
            if not t.cancelled():
                t.exception()  # retrieved here so a failure nobody awaited is not reported twice

        task.add_done_callback(_done)
        return task

    async def run(self, key: K, work: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """Join the work in flight for ``key`` (or start it) and wait for its result."""
        return await asyncio.shield(self.start(key, work))

    async def close(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the work in flight, then cancel what is left."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
