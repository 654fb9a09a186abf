"""``AsyncBrokerCredential``: azure-core's ``AsyncTokenCredential`` and ``AsyncSupportsTokenInfo``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

from . import _common
from ._common import Endpoint, Entry, KeySource


class AsyncBrokerCredential:
    """The asyncio twin of :class:`BrokerCredential`: one broker request shared by every task
    waiting for a token (single-flight), the token kept in memory until ``refresh_in``.
    Use it from one event loop."""

    def __init__(
        self,
        broker_url: str,
        account_id: str,
        *,
        key: str | None = None,
        key_file: str | None = None,
        service_account_token_file: str | None = None,
        timeout: float = _common.DEFAULT_TIMEOUT,
    ) -> None:
        self._endpoint = Endpoint(
            broker_url, account_id, KeySource(key, key_file, service_account_token_file)
        )
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, _common.CONNECT_TIMEOUT)),
            headers={"User-Agent": f"dynamics-token-broker-client/{_common.__version__}"},
            trust_env=False,
        )
        self._entry: Entry | None = None
        # The broker request in flight, plain and forced (claims challenge) ones apart.
        self._inflight: dict[bool, asyncio.Task[Entry]] = {}
        self._closed = False
        self._clock: Callable[[], float] = _common.now

    def __repr__(self) -> str:
        e = self._endpoint
        return f"AsyncBrokerCredential({e.broker_url!r}, {e.account_id!r}, {e.keys.describe()})"

    # -- azure-core ---------------------------------------------------------------------------

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        return (await self._get(scopes, claims if claims and claims.strip() else None)).access_token()

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        return (await self._get(scopes, _common.claims_of(options))).info()

    async def close(self) -> None:
        self._closed = True
        for task in list(self._inflight.values()):
            task.cancel()
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBrokerCredential:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.close()

    # -- the cache ----------------------------------------------------------------------------

    async def _get(self, scopes: tuple[str, ...], claims: str | None) -> Entry:
        entry = self._entry
        _common.check_scopes(scopes, entry.api_url if entry else None)
        if self._closed:
            raise RuntimeError("AsyncBrokerCredential is closed")
        forced = claims is not None
        if not forced and entry is not None and entry.fresh(self._clock()):
            return entry
        task = self._inflight.get(forced)
        if task is None:
            # Registered before the first await: every task arriving meanwhile waits on this one.
            min_ttl = _common.forced_min_ttl(entry, self._clock()) if forced else 0
            task = asyncio.get_running_loop().create_task(self._fetch(min_ttl))
            self._inflight[forced] = task
            task.add_done_callback(lambda t: self._done(forced, t))
        # shield: a caller cancelled while waiting does not cancel the request the others wait for.
        entry = await asyncio.shield(task)
        _common.check_scopes(scopes, entry.api_url)
        return entry

    def _done(self, forced: bool, task: asyncio.Task[Entry]) -> None:
        if self._inflight.get(forced) is task:
            del self._inflight[forced]
        if not task.cancelled() and task.exception() is None:
            self._entry = task.result()

    async def _fetch(self, min_ttl: int) -> Entry:
        endpoint = self._endpoint
        try:
            response = await self._http.get(
                endpoint.url, params=endpoint.params(min_ttl), headers=endpoint.headers()
            )
        except httpx.HTTPError as exc:
            raise endpoint.network_error(exc) from None
        return endpoint.parse(response, self._clock())
