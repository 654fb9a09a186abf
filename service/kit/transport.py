"""Sending one request to Azure AD or Dynamics over the app's shared, kept-alive connections.

Every HTTP server closes idle connections (uvicorn after 5 s, Azure's front ends and load
balancers after minutes). A client that reuses a connection just as the server closes it gets a
fast ``RemoteProtocolError``/``ReadError``/``WriteError`` although the server is fine. ``send``
sends such a request once more, on a new connection, within what is left of the time limit; any
other failure, and a second drop, reach the caller. Policy retries (backoff, Retry-After) are the
broker's, not this module's.

Sending twice is safe for every request the broker makes: Azure keeps a refresh token valid after
rotating it, the client-credentials grant and ``GET WhoAmI`` change nothing, and a code redeemed
twice fails as plainly as a code whose answer was lost.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import httpx

DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class UnsendableURL(ValueError):
    """httpx cannot build a request for the URL (e.g. a host IDNA refuses); nothing was sent."""


async def send(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    limit: float,
    headers: Mapping[str, str],
    data: Mapping[str, str] | None = None,
) -> httpx.Response:
    """``method url`` with every phase bounded by ``limit`` seconds; redirects never followed.

    Raises ``UnsendableURL`` when no request can be built for ``url``, else httpx's errors."""
    started = time.monotonic()
    try:
        return await http.send(_build(http, method, url, limit, headers, data), follow_redirects=False)
    except DROPPED:
        left = limit - (time.monotonic() - started)
        if left < limit / 2:  # slow: not a dropped idle connection but a failing server
            raise
    # httpx has discarded the dropped connection: this goes out on a new one.
    return await http.send(_build(http, method, url, left, headers, data), follow_redirects=False)


def _build(
    http: httpx.AsyncClient,
    method: str,
    url: str,
    limit: float,
    headers: Mapping[str, str],
    data: Mapping[str, str] | None,
) -> httpx.Request:
    try:
        return http.build_request(method, url, headers=headers, data=data, timeout=httpx.Timeout(limit))
    # httpx raises these outside its HTTPError tree; callers would otherwise see a foreign error.
    except (httpx.InvalidURL, ValueError) as exc:  # IDNAError is a UnicodeError, a ValueError
        raise UnsendableURL("no request can be built for this URL") from exc
