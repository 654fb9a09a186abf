"""Pure ASGI middleware: request ids, the access log, and the request body limit.

Query strings are never logged (``/oauth/callback`` carries authorization codes). Token cache
hits never reach this layer: the fast path in front of it answers them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.context import Context
from service.errors import BrokerError, Forbidden, Unauthorized
from service.keys.store import Principal
from service.kit.http import bearer_key
from service.kit.problems import PROBLEM, problem_body
from service.proxy.paths import is_proxy_path

access_log = logging.getLogger("service.access")


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            extra = {"account_id": account} if (account := scope["state"].get("account_id")) else {}
            access_log.info(
                "request",
                extra={
                    **extra,
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


class BodyLimit:
    """Refuse bodies over ``limit`` bytes early: by Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._refuse(send)
                return
        seen = 0
        refused = False

        async def limited() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    refused = True
                    raise _TooLarge
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)
        except Exception:
            if refused and not started:
                await self._refuse(send)
                return
            raise

    async def _refuse(self, send: Send) -> None:
        body = problem_body(
            413, "payload_too_large", "Request body too large", f"Send at most {self.limit} bytes."
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", PROBLEM.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised from ``receive``: FastAPI re-raises HTTP exceptions met while reading a body, so the
    problem handler answers 413 (any other exception there becomes FastAPI's own 400)."""

    def __init__(self) -> None:
        super().__init__(413, "Request body too large")


PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/oauth/callback"})


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path == "/docs" or path.startswith("/docs/")


def _may_client(method: str, path: str) -> bool:
    if is_proxy_path(path):
        return True  # the proxy (service/proxy/), for client keys as for admin keys
    return method in ("GET", "HEAD") and path.startswith("/accounts/") and path.endswith("/token")


class RequireKey:
    """Check the API key before anything reads the request body.

    FastAPI parses a body before running dependencies, so without this a malformed body would be
    answered 422 to a caller without a valid key. The route dependencies (``service/deps.py``) check
    again and document the scheme in OpenAPI; the principal found here is handed to them.
    """

    def __init__(self, app: ASGIApp, context: Callable[[], Context | None]) -> None:
        self.app = app
        self.context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.context()
        if scope["type"] != "http" or ctx is None or _is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        principal: Principal | None = state.get("principal")
        if principal is None:
            key = bearer_key(scope["headers"])
            try:
                # A key made on another replica since the last sync is looked up in the database.
                principal = await ctx.keys.resolve(key) if key else None
            except BrokerError as error:
                await _problem(send, scope, error)
                return
        if principal is None:
            await _problem(send, scope, Unauthorized())
            return
        if not principal.is_admin and not _may_client(scope["method"], scope["path"]):
            await _problem(send, scope, Forbidden("This operation needs an admin API key."))
            return
        state["principal"] = principal
        await self.app(scope, receive, send)


async def _problem(send: Send, scope: Scope, error: BrokerError) -> None:
    """The same document ``problems.problem_response`` renders, sent below the framework."""
    body = problem_body(error.status, error.code, error.title, error.detail, instance=scope["path"])
    headers = [(b"content-type", PROBLEM.encode()), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
