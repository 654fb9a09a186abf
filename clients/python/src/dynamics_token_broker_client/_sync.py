"""``BrokerCredential``: azure-core's ``TokenCredential`` and ``SupportsTokenInfo``, backed by the broker."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

from . import _common
from ._common import Endpoint, Entry, KeySource


class BrokerCredential:
    """Access tokens for one Dynamics Token Broker account, for any azure-core based SDK.

    ``BrokerCredential("http://token-broker:8080", "default", service_account_token_file=path)``.
    Exactly one of ``key``, ``key_file`` or ``service_account_token_file``; the files are re-read
    when they change. The token is kept in memory until the broker's ``refresh_in`` and concurrent
    callers share one broker request. Thread-safe.
    """

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
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, _common.CONNECT_TIMEOUT)),
            headers={"User-Agent": f"dynamics-token-broker-client/{_common.__version__}"},
            trust_env=False,
        )
        self._lock = threading.Lock()
        self._entry: Entry | None = None
        self._closed = False
        self._clock: Callable[[], float] = _common.now

    def __repr__(self) -> str:
        e = self._endpoint
        return f"BrokerCredential({e.broker_url!r}, {e.account_id!r}, {e.keys.describe()})"

    # -- azure-core ---------------------------------------------------------------------------

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        return self._get(scopes, claims if claims and claims.strip() else None).access_token()

    def get_token_info(self, *scopes: str, options: TokenRequestOptions | None = None) -> AccessTokenInfo:
        return self._get(scopes, _common.claims_of(options)).info()

    def close(self) -> None:
        self._closed = True
        self._http.close()

    def __enter__(self) -> BrokerCredential:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the cache ----------------------------------------------------------------------------

    def _get(self, scopes: tuple[str, ...], claims: str | None) -> Entry:
        entry = self._entry
        _common.check_scopes(scopes, entry.api_url if entry else None)
        if self._closed:
            raise RuntimeError("BrokerCredential is closed")
        if claims is None and entry is not None and entry.fresh(self._clock()):
            return entry
        with self._lock:  # one broker request at a time; the others find its result
            current = self._entry
            if current is not None and (
                current is not entry if claims is not None else current.fresh(self._clock())
            ):
                entry = current
            else:
                min_ttl = _common.forced_min_ttl(current, self._clock()) if claims is not None else 0
                entry = self._entry = self._fetch(min_ttl)
        _common.check_scopes(scopes, entry.api_url)
        return entry

    def _fetch(self, min_ttl: int) -> Entry:
        endpoint = self._endpoint
        try:
            response = self._http.get(
                endpoint.url, params=endpoint.params(min_ttl), headers=endpoint.headers()
            )
        except httpx.HTTPError as exc:
            raise endpoint.network_error(exc) from None
        return endpoint.parse(response, self._clock())
