"""``GET|POST|PATCH|PUT|DELETE /accounts/{id}/api/{path}``: the Dynamics Web API, through the broker.

Thin: the route hands the raw request to ``ProxyService`` and returns its streamed response. One
route per method, so each has its own operation in the OpenAPI document. In the served stack,
requests with an accepted key are answered by ``asgi.ProxyBypass`` in front of FastAPI, the same
way (it shares ``incoming`` and the service); these routes document them and serve the rest.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response

from service.deps import AccountId, Caller, Ctx
from service.kit.schemas import Problem
from service.proxy.asgi import incoming

router = APIRouter(tags=["proxy"])

PATH = "/accounts/{account_id}/api/{path:path}"
METHODS = ("GET", "POST", "PATCH", "PUT", "DELETE")
ProxyPath = Annotated[
    str, Path(description="The Web API path below the account's `api_url`, e.g. `WhoAmI` or `accounts`")
]

DESCRIPTION = (
    "Forwards to `{api_url}/{path}?{query}` of the account with its bearer token; the caller's "
    "`Authorization`, `Cookie`, `Host` and hop-by-hop headers stay here. The upstream status, headers "
    "and body come back as they are (redirects are not followed). An upstream 401 costs one token "
    "refresh and one resend when the body is at most 1 MiB. Per account and replica at most "
    "BROKER_PROXY_MAX_CONCURRENT requests are in flight; others wait in order up to "
    "BROKER_PROXY_MAX_WAIT_SECONDS, then get 429. After an upstream 429 or 503 with Retry-After the "
    "account is paused on every replica."
)
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The upstream response, as it is (any status the Web API answers)",
        "content": {"*/*": {"schema": {}}},
    },
    400: {"model": Problem, "description": "invalid_path: the path leaves the account's API URL"},
    401: {"model": Problem, "description": "Missing or invalid API key"},
    403: {"model": Problem, "description": "The key's role may not"},
    404: {"model": Problem, "description": "account_not_found (or outside the key's scope)"},
    409: {"model": Problem, "description": "needs_authorization or invalid_credentials: a person must act"},
    413: {"model": Problem, "description": "payload_too_large: over BROKER_PROXY_MAX_BODY_BYTES"},
    429: {"model": Problem, "description": "throttled: the account's budget is used up; see Retry-After"},
    502: {"model": Problem, "description": "upstream_error: the Web API could not be reached"},
    503: {"model": Problem, "description": "upstream_unavailable: no token now; retry after Retry-After"},
}
BODY = {"requestBody": {"required": False, "content": {"application/json": {"schema": {}}}}}


async def proxy(
    request: Request, account_id: AccountId, path: ProxyPath, ctx: Ctx, caller: Caller
) -> Response:
    service = ctx.proxy
    assert service is not None
    sent = incoming(request)
    rest = service.check_path(sent)
    account = await service.resolve(caller, account_id)
    request.state.account_id = account  # for the access log line
    return await service.forward(account, rest, sent)


for _method in METHODS:
    router.add_api_route(
        PATH,
        proxy,
        methods=[_method],
        name=f"proxy_{_method.lower()}",
        operation_id=f"proxy_{_method.lower()}",
        summary=f"{_method} on the account's Dynamics Web API",
        description=DESCRIPTION,
        responses=RESPONSES,
        response_class=Response,
        openapi_extra=BODY if _method in ("POST", "PATCH", "PUT") else None,
    )
