"""A refresh transaction over a batch of accounts (the claim, the store), as the Batcher calls it.

Invariants:
* An item a batch does not decide (its row locked by another transaction, or its account twice
  in the batch) is answered ``SKIPPED`` and decided ``alone``: the same transaction for that one
  item, waiting for its locks (at most the lock timeout).
* A batch the database fails as a whole is answered ``SKIPPED`` for every item, so each is tried
  alone before any is given up: one bad moment of a batch is not every account's failure.
"""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

from service.errors import StorageUnavailable, UpstreamUnavailable

log = logging.getLogger("service.broker")

T = TypeVar("T")
R = TypeVar("R")


class Skipped:
    """Not decided in this batch: decided alone."""


SKIPPED = Skipped()


class BatchStep(Generic[T, R]):
    kind = "refresh"  # for the log line: "claim", "store"

    async def __call__(self, items: list[T]) -> list[R | Skipped | BaseException]:
        """A batch (the Batcher's handler): its rows' locks are never waited for."""
        try:
            return await self._run(items, skip_locked=True)
        except (StorageUnavailable, UpstreamUnavailable) as exc:
            if len(items) == 1:
                raise
            log.warning(
                f"{self.kind} batch failed; its items are tried one by one", extra={"reason": exc.reason}
            )
            return [SKIPPED] * len(items)

    async def alone(self, item: T) -> R:
        """One item, waiting for its rows' locks."""
        result = (await self._run([item], skip_locked=False))[0]
        if isinstance(result, BaseException):
            raise result
        assert not isinstance(result, Skipped)  # alone, nothing is skipped
        return result

    async def _run(self, items: list[T], *, skip_locked: bool) -> list[R | Skipped | BaseException]:
        raise NotImplementedError
