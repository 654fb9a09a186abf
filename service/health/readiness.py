"""Readiness from a recent result: probes cost the database at most one ping a second.

Invariant: an answer is at most ``max_age`` seconds old, and however many probes arrive at once,
one check runs (a per-process single-flight: registered before the first await, shielded so a
probe that disconnects does not cancel it for the others). Unauthenticated probes therefore
cannot be turned into database load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    status: int
    reason: str
    detail: str | None = None


class Readiness:
    def __init__(
        self,
        check: Callable[[], Awaitable[Verdict]],
        *,
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        self._max_age = max_age
        self._clock = clock
        self._last: tuple[float, Verdict] | None = None
        self._inflight: asyncio.Task[Verdict] | None = None

    async def verdict(self) -> Verdict:
        if self._last is not None and self._clock() - self._last[0] < self._max_age:
            return self._last[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._run())
        return await asyncio.shield(self._inflight)

    async def _run(self) -> Verdict:
        started = self._clock()
        try:
            found = await self._check()
            self._last = (started, found)
            return found
        finally:
            self._inflight = None
