"""Per-account pacing of proxied requests on this replica.

Invariants:
* At most ``capacity`` requests per account are upstream at once (a place is held from just before
  the request is sent until its response body is closed); callers beyond that wait first in,
  first out.
* No caller waits longer than ``max_wait`` in all: one who cannot get a place in time, or whom an
  upstream pause would keep beyond it, gets ``Throttled`` (429 with Retry-After) at once.
* Nothing is sent for a paused account: a caller holding a place re-checks the pause after every
  wait, and between that check and the send there is no await (the service sends right away).
"""

from __future__ import annotations

import asyncio
import email.utils
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from service.errors import Throttled
from service.proxy.limiter import FifoLimiter
from service.proxy.pauses import PauseBook


@dataclass
class Slot:
    """One place in an account's limit; ``release`` is idempotent."""

    account_id: str
    waited: float
    _release: Callable[[], None] = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release()


class Pacer:
    def __init__(
        self,
        *,
        capacity: int,
        max_wait: float,
        pauses: PauseBook,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.capacity = capacity
        self.max_wait = max_wait
        self.pauses = pauses
        self.clock = pauses.clock
        self._sleep = sleep
        self._limiters: dict[str, FifoLimiter] = {}

    def in_flight(self, account_id: str) -> int:
        limiter = self._limiters.get(account_id)
        return limiter.holders if limiter is not None else 0

    def _refuse_if_paused_beyond(self, account_id: str, deadline: float) -> float:
        left = self.pauses.remaining(account_id)
        if left > 0 and self.clock() + left > deadline:
            raise Throttled(
                "Dynamics asked the broker to wait before sending more for this account.",
                retry_after=left,
                reason="upstream_pause",
            )
        return left

    async def acquire(self, account_id: str) -> Slot:
        """A place for one request, after any pause that ends within the bound."""
        started = self.clock()
        deadline = started + self.max_wait
        self._refuse_if_paused_beyond(account_id, deadline)
        limiter = self._limiters.get(account_id)
        if limiter is None:
            limiter = self._limiters[account_id] = FifoLimiter(self.capacity)
        try:
            await limiter.acquire(deadline - self.clock())
        except TimeoutError:
            self._forget_if_idle(account_id, limiter)
            raise Throttled(
                "Too many requests are waiting for this account on this replica.",
                retry_after=max(1.0, self.pauses.remaining(account_id)),
                reason="queue_full",
            ) from None
        slot = Slot(account_id, 0.0, lambda: self._release(account_id, limiter))
        try:
            while (left := self._refuse_if_paused_beyond(account_id, deadline)) > 0:
                await self._sleep(left)  # holding the place: order is kept, nothing is sent meanwhile
        except BaseException:
            slot.release()
            raise
        slot.waited = max(0.0, self.clock() - started)
        return slot

    def _release(self, account_id: str, limiter: FifoLimiter) -> None:
        limiter.release()
        self._forget_if_idle(account_id, limiter)

    def _forget_if_idle(self, account_id: str, limiter: FifoLimiter) -> None:
        if limiter.idle and self._limiters.get(account_id) is limiter:
            del self._limiters[account_id]


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), at most an hour;
    None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - now
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), 3600.0)
