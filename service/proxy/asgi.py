"""Proxy paths go around the app-wide body limit: they stream bodies under their own limit.

``BodyLimit`` (``api/middleware.py``) refuses anything over ``BROKER_MAX_BODY_BYTES`` (64 KiB) for
the admin API; a proxied request may carry up to ``BROKER_PROXY_MAX_BODY_BYTES``, counted by the
proxy itself while it streams the body upstream (``service.take_body``). Nothing else differs.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from service.proxy.paths import is_proxy_path


class ProxyBypass:
    def __init__(self, limited: ASGIApp, direct: ASGIApp) -> None:
        self.limited = limited
        self.direct = direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_proxy_path(scope["path"]):
            await self.direct(scope, receive, send)
        else:
            await self.limited(scope, receive, send)
