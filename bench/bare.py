"""A bare ASGI app answering every HTTP request with the bytes of a token cache hit.

The floor for the broker's fast path: the same server with the same options, doing no work.
``python -m bench.bare --port N [--body FILE]`` runs it through ``token-broker serve`` itself
(``service.cli.main``) with ``service.app.create_asgi`` swapped for this app, so the
``uvicorn.Config`` (one worker, no access log, same HTTP and loop implementations, keep-alive),
the signal handling and the logging set-up are exactly those of the broker, even when they change.
``uvicorn bench.bare:app`` works too, with uvicorn's defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

# The same headers as service/api/fastpath.py sends on a hit.
HEADERS = [
    (b"content-type", b"application/json"),
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
]
LOOP_LINE = "bench.bare: event loop"
SAMPLE_BODY = (
    b'{"access_token":"eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.' + b"x" * 300 + b'","token_type":"Bearer",'
    b'"expires_in":3541,"refresh_in":3241,"expires_at":"2030-01-01T00:00:00Z",'
    b'"api_url":"https://contoso.crm.dynamics.com/api/data/v9.2",'
    b'"account_id":"00000000-0000-0000-0000-000000000000"}'
)


def make_app(body: bytes) -> ASGIApp:
    headers = [*HEADERS, (b"content-length", str(len(body)).encode())]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    # The runner reads this to report the loop `token-broker serve` really runs.
                    loop = type(asyncio.get_running_loop())
                    print(f"{LOOP_LINE} {loop.__module__}.{loop.__qualname__}", flush=True)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def _body() -> bytes:
    path = os.environ.get("BENCH_BODY_FILE")
    return Path(path).read_bytes() if path else SAMPLE_BODY


app = make_app(_body())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, help="file with the response body (default: a sample)")
    args = parser.parse_args(argv)
    bare = make_app(args.body.read_bytes() if args.body else _body())

    import service.app
    from service import cli

    def create_asgi(_settings: Any = None) -> ASGIApp:
        return bare

    service.app.create_asgi = create_asgi  # type: ignore[assignment]  # serve() imports it when called
    return cli.main(["serve", "--port", str(args.port)])


if __name__ == "__main__":
    sys.exit(main())
