"""Which headers cross the proxy, each way.

Invariant: hop-by-hop headers (RFC 9110 section 7.6.1: Connection, Keep-Alive, Proxy-*, TE,
Trailer, Transfer-Encoding, Upgrade, and every header the Connection header names) never cross in
either direction; the caller's Authorization, Cookie and Host never reach upstream (the account's
bearer token is set instead), nor do Content-Length (the body is re-framed) or Expect (httpx does
not do 100-continue). Everything else crosses as it is, repeated headers included.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade"}
)
CALLER_ONLY = frozenset({b"authorization", b"cookie", b"host", b"content-length", b"expect"})


def _named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return named


def _end_to_end(headers: Iterable[tuple[bytes, bytes]], also_drop: frozenset[bytes]) -> Headers:
    items = list(headers)
    drop = HOP_BY_HOP | also_drop | _named_by_connection(items)
    return [
        (name, value)
        for name, value in items
        if (low := name.lower()) not in drop and not low.startswith(b"proxy-")
    ]


def request_headers(headers: Iterable[tuple[bytes, bytes]], token: str) -> Headers:
    """The caller's headers as they go upstream, with the account's token."""
    out = _end_to_end(headers, CALLER_ONLY)
    if not any(name.lower() == b"accept-encoding" for name, _ in out):
        # httpx would otherwise ask for gzip on the caller's behalf, and the raw body passed back
        # would be compressed for a caller who did not ask for it.
        out.append((b"accept-encoding", b"identity"))
    out.append((b"authorization", b"Bearer " + token.encode("latin-1")))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """The upstream's headers as they go back to the caller (Content-Length kept: the body is raw)."""
    return _end_to_end(headers, frozenset())
