"""A lean HTTP/1.1 keep-alive GET client for the benchmarks' callers.

Why not httpx: at 200 concurrent callers an httpx client in one process takes a whole core by
itself, on the same two cores as the broker, MariaDB and the fake IdP, so the benchmark would
measure its own client. This one writes a request and reads ``Content-Length`` bytes back: about
a tenth of the CPU. It speaks only what the broker answers (no chunked bodies, no redirects).
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit


class Connection:
    """One caller's keep-alive connection to one server (re-opened when the server closes it)."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need http://host:port, got {url!r}")
        self._host, self._port = parts.hostname, parts.port
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self._head = f"Host: {self._host}:{self._port}\r\n{extra}\r\n".encode()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of ``GET path``."""
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._reader, self._writer
        try:
            writer.write(b"GET " + path.encode() + b" HTTP/1.1\r\n" + self._head)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length, close = 0, False
            for line in head.lower().split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                elif line.startswith(b"transfer-encoding:"):
                    raise ValueError("chunked bodies are not spoken here")
                elif line == b"connection: close":
                    close = True
            body = await reader.readexactly(length)
        except BaseException:
            await self.close()
            raise
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
