"""One forced refresh per rejected token, however many callers saw the rejection.

Invariant (per process): for a given account and rejected access token, at most one forced
refresh runs; every caller that saw that token rejected waits on it (``asyncio.shield``: one
caller going away cannot cancel it) and gets its result or error. A caller whose rejected token is
no longer the broker's current one gets the current token without any refresh, so a 401 that
arrives after the refresh finished costs nothing more. Across replicas the token broker's own
coordination applies (the row lock and re-read): a replica that finds a token newer than the one
it saw rejected takes it instead of asking Azure again.
"""

from __future__ import annotations

import asyncio
import hashlib

from service.tokens.broker import TokenBroker
from service.tokens.response import CachedToken

# The forced refresh asks for a token outliving the rejected one by this much: any newer token
# qualifies, the rejected one does not.
_NEWER_BY_SECONDS = 0.001


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenRenewer:
    def __init__(self, broker: TokenBroker) -> None:
        self._broker = broker
        self._flights: dict[tuple[str, str], asyncio.Task[CachedToken]] = {}
        self.forced = 0  # forced refreshes started (for tests and metrics)

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    async def renew(self, account_id: str, rejected: CachedToken) -> CachedToken:
        """A token other than ``rejected`` if the broker can get one (else ``rejected`` itself)."""
        current = await self._broker.get_token(account_id)
        if current.access_token != rejected.access_token:
            return current
        key = (account_id, _digest(rejected.access_token))
        task = self._flights.get(key)
        if task is None:
            # Registered before the first await of the refresh: concurrent callers find it.
            task = asyncio.get_running_loop().create_task(self._force(account_id, rejected))
            self._flights[key] = task
            self.forced += 1

            def _done(t: asyncio.Task[CachedToken]) -> None:
                if self._flights.get(key) is t:
                    del self._flights[key]
                if not t.cancelled():
                    t.exception()  # retrieved here, so an error nobody awaited is not reported

            task.add_done_callback(_done)
        return await asyncio.shield(task)

    async def _force(self, account_id: str, rejected: CachedToken) -> CachedToken:
        left = rejected.expires_at - self._broker.now()
        return await self._broker.get_token(account_id, min_ttl=max(0.0, left) + _NEWER_BY_SECONDS)
