"""The token cache hit, answered below the framework.

``GET /accounts/{id}/token`` with a valid key, an account in the key's scope and a cached token
with enough time left is answered here: a dictionary lookup, a constant-time key check and
pre-encoded bytes, with no database, no pydantic and no IdP. Everything else (misses, errors,
odd query strings) falls through to the FastAPI route, which documents the endpoint in OpenAPI
and answers errors the same way as every other route.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.context import Context
from service.kit.http import bearer_key

_PREFIX = "/accounts/"
_SUFFIX = "/token"
_START, _END = len(_PREFIX), -len(_SUFFIX)


def _min_ttl(query: bytes) -> int | None:
    if not query:
        return 0
    name, _, value = query.partition(b"=")
    if name != b"min_ttl" or not value.isdigit() or len(value) > 4:
        return None
    number = int(value)
    return number if number <= 3600 else None


class TokenFastPath:
    def __init__(self, app: ASGIApp, context: Callable[[], Context | None]) -> None:
        self.app = app
        self.context = context
        self._ctx: Context | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            if path.startswith(_PREFIX) and path.endswith(_SUFFIX) and await self._hit(scope, send, path):
                return
        await self.app(scope, receive, send)

    async def _hit(self, scope: Scope, send: Send, path: str) -> bool:
        ctx = self._ctx or self.context()
        self._ctx = ctx  # the app's context lives as long as the app; asked for once
        account_id = path[_START:_END]
        query = scope["query_string"]
        min_ttl = _min_ttl(query) if query else 0
        key = bearer_key(scope["headers"])
        if ctx is None or not account_id or "/" in account_id or min_ttl is None or key is None:
            return False
        principal = ctx.keystore.lookup(key)
        if principal is None:
            return False
        broker = ctx.broker
        if account_id == "default":
            account_id = broker.default_account_id or ""
        entry = broker.peek(account_id, broker.need_for(min_ttl)) if principal.may_use(account_id) else None
        if entry is None:
            # The route behind us reuses the principal: one hash, and one usage count, per request.
            scope.setdefault("state", {})["principal"] = principal
            return False
        body, headers = entry.response(broker.now())
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return True
