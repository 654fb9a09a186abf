"""Bounds on what a client may make ``token-broker serve`` hold: header and body read time, size.

uvicorn bounds idle keep-alive connections and (``limit_concurrency``) how many connections it
serves, but neither of its parsers bounds how long a client may take to send a request: a
connection that sends nothing, or a byte a second, stays open as long as the client likes. The
protocol class here is uvicorn's httptools protocol with three additions, kept per connection:

* from the moment the connection opens (or the first byte of the next request on a kept-alive
  one) the request head must be complete within ``header_timeout`` seconds, and be at most
  ``max_header_bytes`` long: otherwise 408 (or 431) and the connection is closed;
* from the end of the head, the body must be complete within ``body_timeout`` seconds: otherwise
  the connection is closed (the application sees a disconnect);
* the timers live on the event loop (``call_later``): no task per connection, nothing on the
  hot path but a counter while the head is read.
The limits are the settings ``BROKER_HEADER_TIMEOUT_SECONDS``, ``BROKER_BODY_TIMEOUT_SECONDS``
and a fixed ``MAX_HEADER_BYTES``; ``cli.serve`` installs the class.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 32 * 1024  # Azure's callback URL and a bearer key fit many times over

_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._guard: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = 0  # None: not reading a head

    @classmethod
    def configured(cls, *, header_timeout: float, body_timeout: float) -> type[GuardedHttpToolsProtocol]:
        return type(
            "GuardedHttpToolsProtocol",
            (cls,),
            {"header_timeout": header_timeout, "body_timeout": body_timeout},
        )

    def _arm(self, seconds: float, answer: bytes | None) -> None:
        self._disarm()
        self._guard = self.loop.call_later(seconds, self._expire, answer)

    def _disarm(self) -> None:
        if self._guard is not None:
            self._guard.cancel()
            self._guard = None

    def _expire(self, answer: bytes | None) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        if answer is not None:
            self.transport.write(answer)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout, _TIMEOUT)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._disarm()
                self._expire(_TOO_LARGE)
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_bytes is None:  # the next request on a kept-alive connection
            self._head_bytes = 0
            self._arm(self.header_timeout, _TIMEOUT)

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        self._arm(self.body_timeout, None)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
