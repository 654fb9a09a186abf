"""One account's access token as the token endpoint answers it, encoded once.

The hot path (``api/fastpath.py``) sends these bytes as they are: the JSON body is built from a
prefix and a suffix made when the token arrives, with only ``expires_in`` and ``refresh_in``
changing, once a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

RESPONSE_HEADERS = (
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
)


@dataclass(eq=False)
class CachedToken:
    """One account's access token, with its response body encoded once (all but the two counters)."""

    account_id: str
    access_token: str = field(repr=False)
    expires_at: float
    refresh_at: float
    version: int
    api_url: str
    obtained_at: float
    prefix: bytes = field(repr=False, default=b"")
    suffix: bytes = field(repr=False, default=b"")
    # The last ((expires_in, refresh_in), body, headers) built: the body changes once a second.
    _last: tuple[tuple[int, int], bytes, list[tuple[bytes, bytes]]] = field(
        repr=False, default=((-1, -1), b"", [])
    )
    _headers: dict[int, list[tuple[bytes, bytes]]] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        expires = datetime.fromtimestamp(self.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.prefix = (
            b'{"access_token":'
            + json.dumps(self.access_token).encode()
            + b',"token_type":"Bearer","expires_in":'
        )
        self.suffix = (
            f',"expires_at":"{expires}","api_url":{json.dumps(self.api_url)},'
            f'"account_id":{json.dumps(self.account_id)}}}'
        ).encode()

    def body(self, now: float) -> bytes:
        return self.response(now)[0]

    def response(self, now: float) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        """The body and its HTTP headers, rebuilt only when expires_in or refresh_in changes (each
        once a second; refresh_at need not be a whole second before expires_at)."""
        # refresh_in: seconds until the broker would refresh this token (0 once it is due).
        left = (int(self.expires_at - now), max(0, int(self.refresh_at - now)))
        last = self._last
        if last[0] != left:
            body = self.prefix + b'%d,"refresh_in":%d' % left + self.suffix
            # The headers differ only by the body's length, i.e. by the digits of the counters.
            headers = self._headers.get(len(body))
            if headers is None:
                headers = self._headers[len(body)] = [
                    *RESPONSE_HEADERS,
                    (b"content-length", str(len(body)).encode()),
                ]
            last = self._last = (left, body, headers)
        return last[1], last[2]
