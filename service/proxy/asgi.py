"""Proxy paths, answered below the framework and around the app-wide body limit.

``BodyLimit`` (``api/middleware.py``) refuses anything over ``BROKER_MAX_BODY_BYTES`` (64 KiB) for
the admin API; a proxied request may carry up to ``BROKER_PROXY_MAX_BODY_BYTES``, counted by the
proxy itself while it streams the body upstream (``service.take_body``).

A proxied request whose key ``RequireKey`` already accepted (the principal is in the scope) is
served here, without FastAPI's routing and dependency resolution (which cost more than the rest
of the broker's part): the account id is the path segment FastAPI would pass, errors are rendered
by the app's own problem+json renderer, so callers see the same answers as from the routes in
``endpoints.py``, which remain what the OpenAPI document describes (and serve any request that
arrives without a principal).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import BrokerError, StorageUnavailable
from service.keys.store import Principal
from service.proxy.paths import PREFIX, is_proxy_path
from service.proxy.service import Incoming, ProxyService

log = logging.getLogger("service.api")

METHODS = frozenset({"GET", "POST", "PATCH", "PUT", "DELETE"})  # the others: FastAPI's 405

Render = Callable[[BrokerError, str], Response]


def incoming(request: Request) -> Incoming:
    scope = request.scope
    raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
    return Incoming(
        method=request.method,
        raw_path=raw_path.split(b"?", 1)[0],
        query=scope.get("query_string", b""),
        headers=list(scope["headers"]),
        body=request.stream(),
    )


class ProxyBypass:
    def __init__(
        self,
        limited: ASGIApp,
        direct: ASGIApp,
        service: Callable[[], ProxyService | None] | None = None,
        render: Render | None = None,
    ) -> None:
        self.limited = limited
        self.direct = direct
        self.service = service
        self.render = render

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_proxy_path(scope["path"]):
            await self.limited(scope, receive, send)
            return
        principal: Principal | None = scope.get("state", {}).get("principal")
        service = self.service() if self.service is not None else None
        if principal is None or service is None or self.render is None or scope["method"] not in METHODS:
            await self.direct(scope, receive, send)
            return
        response = await self._answer(service, principal, Request(scope, receive), self.render)
        await response(scope, receive, send)

    @staticmethod
    async def _answer(
        service: ProxyService, principal: Principal, request: Request, render: Render
    ) -> Response:
        path: str = request.scope["path"]
        try:
            sent = incoming(request)
            rest = service.check_path(sent)
            account = await service.resolve(principal, path[len(PREFIX) :].split("/", 1)[0])
            request.scope["state"]["account_id"] = account  # for the access log line
            return await service.forward(account, rest, sent)
        except BrokerError as exc:
            return render(exc, path)
        except SQLAlchemyError as exc:
            log.error("database error", extra={"error_type": type(exc).__name__})
            return render(StorageUnavailable("The database cannot be reached; try again."), path)
        except Exception as exc:  # noqa: BLE001 - what FastAPI's handler does for its routes, here
            log.error("unexpected error", extra={"error_type": type(exc).__name__, "path": path})
            return render(BrokerError("Something went wrong; it has been logged."), path)
