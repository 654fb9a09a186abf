"""Authorizing accounts: start, the hosted callback, the pasted code, and "test connection".

Thin handlers over ``AuthorizationService``. The callback is the one endpoint a browser lands on
without an API key: it answers a small self-contained HTML page (no external assets, nothing
cached, no referrer) and, when the client prefers JSON, problem+json for errors. Everything it
echoes is HTML-escaped; the code and state in its query are never logged (the access log records
paths only) nor repeated.
"""

from __future__ import annotations

from html import escape
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.responses import HTMLResponse
from sqlalchemy.exc import SQLAlchemyError

from service.accounts.schemas import AccountOut
from service.authorization.redirects import Redirect
from service.authorization.schemas import AuthorizationCodeIn, AuthorizeIn, AuthorizeOut, ConnectionTestOut
from service.authorization.service import PENDING_TTL, AuthorizationService
from service.deps import AccountId, Admin, Ctx
from service.errors import BrokerError, InvalidState, StorageUnavailable, Unavailable
from service.kit.http import NO_STORE
from service.kit.problems import PROBLEM, problem_response
from service.kit.schemas import Problem

router = APIRouter(tags=["authorization"])

ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Problem, "description": "Missing or invalid API key"},
    403: {"model": Problem, "description": "The key may not do this"},
    404: {"model": Problem, "description": "account_not_found"},
    422: {"model": Problem, "description": "Invalid input, or a client_credentials account"},
}
PAGE_HEADERS = {
    **NO_STORE,
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:4rem auto;padding:0 1rem;color:#1b1b1b}"
    "h1{font-size:1.5rem}code{background:#f2f2f2;padding:0 .2rem}.ok{color:#0a6b2d}.err{color:#a4161a}"
)
_JSON_TYPES = frozenset({"application/json", "application/problem+json", "application/*"})
_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml", "text/*", "*/*"})
_HOW_TO = "Start again: call <code>POST /accounts/{id}/authorize</code> and open the new authorization_url."


def _page_or_problem(description: str) -> dict[str, object]:
    # Problem is in components/schemas: the other routes' responses reference it by model.
    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    return {
        "description": description,
        "content": {"text/html": {"schema": {"type": "string"}}, PROBLEM: problem},
    }


@router.post(
    "/accounts/{account_id}/authorize",
    response_model=AuthorizeOut,
    responses={
        **ERRORS,
        409: {"model": Problem, "description": "invalid_credentials: fix authorization_url"},
    },
    summary="Start authorizing an account: a sign-in URL (PKCE S256, single-use state)",
    description=(
        "Returns the Azure AD sign-in URL for a person to open. After sign-in Azure AD redirects to "
        "`redirect_uri` with a one-time code: by default the broker's own `/oauth/callback` "
        "(`{BROKER_PUBLIC_URL}/oauth/callback`), which finishes the authorization by itself. Another "
        "`redirect_uri` (`http://localhost[:port]` or `http://127.0.0.1[:port]`, as in the seed, or "
        "one of `BROKER_ALLOWED_REDIRECT_URIS`; anything else is 422) is for the manual flow: paste "
        "the address the browser ends on into "
        "`POST /accounts/{id}/authorization-code`. Either URI **must be registered as a redirect URI "
        "of the app in Azure AD**, or sign-in fails. "
        f"The state is valid for {PENDING_TTL.seconds // 60} minutes and only once. "
        "The URL never carries the client secret."
    ),
)
async def authorize(
    account_id: AccountId,
    ctx: Ctx,
    admin: Admin,
    response: Response,
    body: Annotated[AuthorizeIn | None, Body()] = None,
) -> AuthorizeOut:
    service = AuthorizationService.from_context(ctx)
    redirect_uri = body.redirect_uri if body else None
    started = await service.start(account_id, redirect_uri, actor=admin.fingerprint)
    response.headers.update(NO_STORE)
    return started


@router.get(
    "/oauth/callback",
    response_class=HTMLResponse,
    summary="Where Azure AD sends the browser after sign-in (no API key: the state is the credential)",
    description=(
        "Consumes the single-use state, exchanges the code (with the PKCE verifier) and stores the "
        "refresh token. Answers an HTML page; errors are an HTML page with a 4xx/5xx status, or "
        "problem+json when `Accept` prefers `application/json`."
    ),
    responses={
        200: {"content": {"text/html": {}}, "description": "The account is connected"},
        400: _page_or_problem("invalid_state (unknown, expired or used), or authorization_denied"),
        404: _page_or_problem("account_not_found"),
        409: _page_or_problem("needs_authorization or invalid_credentials: Azure AD refused the code"),
        422: _page_or_problem("the redirect carries neither a code nor an error"),
        503: _page_or_problem("upstream_unavailable or storage_unavailable: try again later"),
    },
)
async def oauth_callback(
    request: Request,
    ctx: Ctx,
    *,
    code: Annotated[str | None, Query(description="The one-time authorization code")] = None,
    state: Annotated[str | None, Query(description="The state from POST /accounts/{id}/authorize")] = None,
    error: Annotated[str | None, Query(description="Azure AD's error, e.g. access_denied")] = None,
    error_description: Annotated[str | None, Query(description="Azure AD's explanation")] = None,
) -> Response:
    service = AuthorizationService.from_context(ctx)
    account_id: str | None = None
    try:
        claim = await service.claim(state)
        account_id = claim.account_id
        redirect = Redirect(code=code, state=state, error=error, error_description=error_description)
        account = await service.finish(claim, redirect, actor=None)
    except BrokerError as exc:
        return _failure(request, exc, account_id)
    except SQLAlchemyError:
        return _failure(request, StorageUnavailable("The database cannot be reached; try again."), account_id)
    body = (
        f'<h1 class="ok">Account connected</h1><p>The integration account <strong>{escape(account.name)}'
        "</strong> is now connected to Microsoft Dynamics 365: the broker stored its refresh token "
        "and hands out access tokens from now on.</p><p>You can close this window.</p>"
    )
    return HTMLResponse(_page("Account connected", body), headers=PAGE_HEADERS)


@router.post(
    "/accounts/{account_id}/authorization-code",
    response_model=AccountOut,
    responses={
        **ERRORS,
        400: {"model": Problem, "description": "invalid_state or authorization_denied"},
        409: {
            "model": Problem,
            "description": "needs_authorization or invalid_credentials: Azure AD said no",
        },
        503: {"model": Problem, "description": "upstream_unavailable"},
    },
    summary="Finish authorizing with a pasted code (the integration guide's manual flow)",
    description=(
        "`code` is the bare code, or the whole address the browser ended on "
        "(`http://localhost/?code=…&state=…&session_state=…`). When that address carries the state "
        "from `POST /accounts/{id}/authorize`, its redirect URI and PKCE verifier are used (and "
        "`redirect_uri` here is ignored). A bare code is exchanged without PKCE, with `redirect_uri` "
        "(default: the broker's `/oauth/callback`), which must be the one the code was issued for."
    ),
)
async def authorization_code(
    account_id: AccountId, body: AuthorizationCodeIn, ctx: Ctx, admin: Admin
) -> AccountOut:
    service = AuthorizationService.from_context(ctx)
    return await service.paste(account_id, body.code, body.redirect_uri, actor=admin.fingerprint)


@router.post(
    "/accounts/{account_id}/test",
    response_model=ConnectionTestOut,
    responses={status: ERRORS[status] for status in (401, 403, 404)},
    summary="Test the connection: get a token and call the Dynamics WhoAmI function",
    description=(
        "Always 200 for an existing account: `ok` true with the Dynamics user, organization and "
        "business unit ids, or `ok` false with `reason`, `message` and `next_step`."
    ),
)
async def test_connection(account_id: AccountId, ctx: Ctx, admin: Admin) -> ConnectionTestOut:
    service = AuthorizationService.from_context(ctx)
    return await service.test_connection(account_id, actor=admin.fingerprint)


# -- the callback's pages ---------------------------------------------------------------------


def _failure(request: Request, exc: BrokerError, account_id: str | None) -> Response:
    if _prefers_json(request.headers.get("accept")):
        answer = problem_response(exc, request.url.path)
        answer.headers.update(NO_STORE)
        return answer
    detail = exc.detail.replace("{id}", account_id) if account_id else exc.detail
    advice = [] if "/authorize" in detail else [_HOW_TO.replace("{id}", escape(account_id or "{id}"))]
    if isinstance(exc, InvalidState):
        advice.insert(0, "The sign-in link may have been opened twice or too late.")
    elif isinstance(exc, Unavailable):
        advice.insert(0, "Try again in a little while; the code is single-use.")
    body = f'<h1 class="err">{escape(exc.title)}</h1><p>{escape(detail)}</p>'
    if advice:
        body += f"<p>{' '.join(advice)}</p>"
    body += f"<p>Error code: <code>{escape(exc.code)}</code></p>"
    headers = {**exc.headers, **PAGE_HEADERS}
    return HTMLResponse(_page(exc.title, body), status_code=exc.status, headers=headers)


def _page(title: str, body: str) -> str:
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · Dynamics Token Broker</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def _prefers_json(accept: str | None) -> bool:
    """True when ``Accept`` ranks JSON above HTML (a browser's default ranks HTML first)."""
    best = {"json": 0.0, "html": 0.0}
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        kind = "json" if media.lower() in _JSON_TYPES else "html" if media.lower() in _HTML_TYPES else None
        if kind is None:
            continue
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[kind] = max(best[kind], quality)
    return best["json"] > best["html"]
