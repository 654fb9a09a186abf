"""A fake Dataverse Web API with its own token endpoint, for the proxy's end-to-end tests.

Own process: ``python -m tests.proxy.fake_dataverse --port 0`` prints ``READY http://127.0.0.1:<port>``;
``running_fake_dataverse()`` wraps that. Plain http on 127.0.0.1: the brokers run with
``BROKER_ALLOW_HTTP=true`` and ``BROKER_ALLOWED_HOSTS=127.0.0.1:*``.

* ``POST /{tenant}/oauth2/token`` (v1, client_credentials): checks the client secret and issues an
  access token this fake then accepts; counts the calls.
* ``/api/data/v9.2/{path}`` (any method): 401 unless the bearer token is one it issued and has not
  revoked; at most ``cap`` requests in flight (more is counted as ``over_cap`` and answered 429); at
  most ``window_limit`` requests per ``window_seconds`` window, then 429 with ``Retry-After`` until
  the window ends; a request during that penalty extends it by ``extend_seconds`` (as Dataverse
  does to clients that keep sending) and is recorded with its offset from the penalty's start.
  ``GET .../big?bytes=N`` streams N bytes. Every header value and URL is searched for the
  ``watch`` strings (the brokers' API keys): ``watch_hits`` must stay 0.
* ``/_control/{mode,revoke,stats,reset}``: configure, revoke every token issued so far, read counts.

Handlers never await between checking and updating state, so the one event loop keeps them atomic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests import fake_process

API_PREFIX = "/api/data/v9.2"
DEFAULTS: dict[str, Any] = {
    "client_secret": "dv-secret",
    "cap": 52,
    "window_limit": 6000,
    "window_seconds": 300.0,
    "extend_seconds": 1.0,
    "delay": 0.0,
    "token_ttl": 3599,
    "watch": [],
}


class State:
    def __init__(self) -> None:
        self.config: dict[str, Any] = dict(DEFAULTS)
        self.valid: set[str] = set()
        self.revoked: set[str] = set()
        self.reset()

    def reset(self) -> None:
        self.token_calls = 0
        self.requests = 0
        self.ok = 0
        self.unauthorized = 0
        self.throttled = 0
        self.over_cap = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.watch_hits = 0
        self.window_start = time.monotonic()
        self.window_count = 0
        self.penalty_until = 0.0
        self.penalty_started = 0.0
        self.during_penalty: list[float] = []  # seconds since the penalty began, per request during it
        self.penalties = 0

    def stats(self) -> dict[str, Any]:
        keys = (
            "token_calls", "requests", "ok", "unauthorized", "throttled", "over_cap", "in_flight",
            "max_in_flight", "watch_hits", "during_penalty", "penalties",
        )  # fmt: skip
        return {key: getattr(self, key) for key in keys} | {"config": self.config}

    def throttle(self, now: float) -> Response | None:
        """The window and the penalty: a 429 to answer now, or None."""
        if now < self.penalty_until:
            self.during_penalty.append(round(now - self.penalty_started, 3))
            self.penalty_until += float(self.config["extend_seconds"])
            return self._too_many(now)
        if now - self.window_start >= float(self.config["window_seconds"]):
            self.window_start, self.window_count = now, 0
        if self.window_count >= int(self.config["window_limit"]):
            self.penalty_started = now
            self.penalty_until = self.window_start + float(self.config["window_seconds"])
            self.penalties += 1
            return self._too_many(now)
        self.window_count += 1
        return None

    def _too_many(self, now: float) -> Response:
        self.throttled += 1
        wait = max(1, math.ceil(self.penalty_until - now))
        body = {"error": {"code": "0x80072322", "message": "Number of requests exceeded the limit"}}
        return JSONResponse(body, status_code=429, headers={"Retry-After": str(wait)})


def _state(request: Request) -> State:
    st: State = request.app.state.fake
    return st


def _watched(st: State, request: Request) -> bool:
    watch = [w for w in st.config["watch"] if w]
    texts = [str(request.url), *(v for _, v in request.headers.items())]
    return any(w in text for w in watch for text in texts)


async def token(request: Request) -> Response:
    st = _state(request)
    st.token_calls += 1
    if _watched(st, request):
        st.watch_hits += 1
    form = dict(parse_qsl((await request.body()).decode()))
    secret_ok = form.get("client_secret") == st.config["client_secret"]
    if form.get("grant_type") != "client_credentials" or not secret_ok:
        error = {"error": "invalid_client", "error_description": "AADSTS7000215"}
        return JSONResponse(error, status_code=401)
    access = "dv." + secrets.token_urlsafe(24)
    st.valid.add(access)
    ttl = int(st.config["token_ttl"])
    body = {"token_type": "Bearer", "expires_in": str(ttl), "ext_expires_in": str(ttl)}
    body["access_token"] = access
    body |= {"expires_on": str(int(time.time()) + ttl), "resource": form.get("resource", "")}
    return JSONResponse(body)


async def api(request: Request) -> Response:
    st = _state(request)
    st.requests += 1
    if _watched(st, request):
        st.watch_hits += 1
    auth = request.headers.get("authorization", "")
    presented = auth[7:] if auth[:7].lower() == "bearer " else ""
    if presented not in st.valid or presented in st.revoked:
        st.unauthorized += 1
        return Response(status_code=401, headers={"WWW-Authenticate": "Bearer"})
    refused = st.throttle(time.monotonic())
    if refused is not None:
        return refused
    if st.in_flight >= int(st.config["cap"]):
        st.over_cap += 1
        return st._too_many(time.monotonic())
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        await request.body()
        if st.config["delay"]:
            await asyncio.sleep(float(st.config["delay"]))
        path = request.url.path[len(API_PREFIX) :]
        if path == "/big":
            size = int(request.query_params.get("bytes", "0"))
            st.in_flight += 1  # held until the stream ends (released below by the generator)
            return StreamingResponse(_chunks(st, size), media_type="application/octet-stream")
        st.ok += 1
        return JSONResponse({"value": [], "path": path, "method": request.method})
    finally:
        st.in_flight -= 1


async def _chunks(st: State, size: int) -> AsyncIterator[bytes]:
    chunk = b"d" * 65_536
    try:
        while size > 0:
            piece = chunk[: min(size, len(chunk))]
            size -= len(piece)
            yield piece
        st.ok += 1
    finally:
        st.in_flight -= 1


async def control(request: Request) -> Response:
    st, action = _state(request), request.path_params["action"]
    body = await request.json() if request.method == "POST" and await request.body() else {}
    if action == "mode":
        unknown = set(body) - set(DEFAULTS)
        if unknown:
            return JSONResponse({"error": f"unknown settings {sorted(unknown)}"}, 400)
        st.config.update(body)
    elif action == "revoke":
        st.revoked |= st.valid
        return JSONResponse({"revoked": len(st.revoked)})
    elif action == "reset":
        st.reset()
    elif action != "stats":
        return JSONResponse({"error": f"unknown control action {action!r}"}, 404)
    return JSONResponse(st.stats())


def build_app() -> Starlette:
    methods = ["GET", "POST", "PATCH", "PUT", "DELETE"]
    app = Starlette(
        routes=[
            Route("/_control/{action}", control, methods=["GET", "POST"]),
            Route("/{tenant}/oauth2/token", token, methods=["POST"]),
            Route(API_PREFIX + "/{path:path}", api, methods=methods),
        ]
    )
    app.state.fake = State()
    return app


async def serve(host: str, port: int) -> None:
    await fake_process.serve(build_app(), fake_process.listening_socket(host, port))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.proxy.fake_dataverse", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port))


@dataclass
class FakeDataverse:
    url: str
    process: subprocess.Popen[bytes]
    client: httpx.Client

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    def control(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.client.post(f"/_control/{action}", json=body or {})
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def stats(self) -> dict[str, Any]:
        return self.control("stats")

    def account_body(self, **extra: Any) -> dict[str, Any]:
        """A client_credentials account whose token and API URLs are this fake."""
        tenant = "7f3b7d01-a049-4dfd-9dbd-d394e711c3a0"
        return {
            "name": f"dv-{secrets.token_hex(4)}",
            "tenant_id": tenant,
            "client_id": "dc40e7c1-86fa-484e-a38b-bec0d31c945a",
            "client_secret": self.config_secret,
            "grant_type": "client_credentials",
            "authorization_url": f"{self.url}/{tenant}/oauth2/authorize",
            "token_url": f"{self.url}/{tenant}/oauth2/token",
            "api_url": self.api_url,
            **extra,
        }

    config_secret: str = DEFAULTS["client_secret"]


@contextlib.contextmanager
def running_fake_dataverse(ready_timeout: float = 20.0, **config: Any) -> Iterator[FakeDataverse]:
    """Run the fake in a subprocess, configured with ``config`` (see ``DEFAULTS``)."""
    command = fake_process.module_command("tests.proxy.fake_dataverse")
    with (
        fake_process.running(command, name="fake Dataverse", ready_timeout=ready_timeout) as (url, proc),
        httpx.Client(base_url=url, timeout=10.0, trust_env=False) as client,
    ):
        fake = FakeDataverse(url, proc, client)
        if config:
            fake.control("mode", config)
        yield fake


if __name__ == "__main__":
    main()
