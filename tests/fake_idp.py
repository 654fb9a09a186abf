"""A fake Azure AD (v1 + v2 token and authorize endpoints) and Dynamics WhoAmI, for tests.

Own process: ``python -m tests.fake_idp --port 0`` prints ``READY http://127.0.0.1:<port>``;
``running_fake_idp()`` wraps that. In process: ``build_app(FakeIdpState())``. Control API: ``/_control/``.
Handlers never await between checking and updating state, so one event loop keeps them atomic.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import secrets
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlencode

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from tests import fake_process, helpers

TOKEN_MODES = ("down", "throttle", "slow", "garbage", "invalid_client", "hold")  # act on token calls only
MODES = ("normal", *TOKEN_MODES, "deny_authorize", "whoami_forbidden")
HOLD_LIMIT = 120.0  # a held request goes on by itself after this many seconds
NS = uuid.UUID("6f0e5b1c-2c55-4d8e-9a55-0d1f1a2b3c4d")
DEFAULTS = {"mode": "normal", "retry_after": 1, "delay": 0.5, "token_ttl": 3599}
DEFAULTS["refresh_token_mode"] = "strict"  # strict: single-use refresh tokens; azure: old ones stay valid
GARBAGE = "<!DOCTYPE html><html><head><title>Sign in to your account</title></head><body>Oops</body></html>"


@dataclass
class Client:
    secret: str | None  # None: a public client, no secret checked (unless it has certificates)
    tenant: str | None  # None: any tenant
    redirect_uris: list[str] | None  # None: any redirect_uri
    other_secrets: list[str] = field(default_factory=list)  # also valid (a secret being rotated)
    certificates: dict[str, Any] = field(default_factory=dict)  # x5t#S256 -> public key
    federated_subjects: list[str] = field(default_factory=list)  # sub claims a federated token may carry

    @property
    def confidential(self) -> bool:
        return self.secret is not None or bool(self.certificates or self.federated_subjects)


@dataclass
class Grant:
    """A refresh token or an authorization code."""

    client_id: str
    resource: str = ""
    scope: str = ""
    used: bool = False
    redirect_uri: str = ""
    challenge: str | None = None
    method: str = "plain"
    expires_at: float = float("inf")


class FakeIdpState:
    def __init__(self, **config: Any) -> None:
        self.clients: dict[str, Client] = {}
        self.refresh_tokens: dict[str, Grant] = {}
        self.codes: dict[str, Grant] = {}
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token -> (client_id, expires_at)
        self.assertion_ids: set[str] = set()  # jti of every certificate assertion seen (no replay)
        self.config: dict[str, Any] = dict(DEFAULTS)
        self.release_event = asyncio.Event()
        self.in_flight, self.held = 0, 0
        self.in_flight_by_client: Counter[str] = Counter()
        self.configure(config)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.totals: Counter[str] = Counter()
        self.counters: dict[str, Counter[str]] = defaultdict(Counter)
        self.max_in_flight = self.in_flight
        self.counters["max_in_flight_by_client"].update(+self.in_flight_by_client)

    def add_client(
        self,
        client_id: str,
        client_secret: str | None = None,
        tenant: str | None = None,
        redirect_uris: Any = None,
        other_secrets: Any = (),
        certificates: Any = (),
        federated_subjects: Any = (),
    ) -> str:
        """Register (or replace) a client; ``certificates``: PEM certificates it trusts."""
        keys = {}
        for pem in certificates:
            cert = x509.load_pem_x509_certificate(pem.encode())
            digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
            keys[_b64(digest)] = cert.public_key()
        self.clients[client_id] = Client(
            client_secret, tenant, redirect_uris, list(other_secrets), keys, list(federated_subjects)
        )
        return client_id

    def add_refresh_token(
        self, client_id: str, refresh_token: str | None = None, resource: str = "", scope: str = ""
    ) -> str:
        token = refresh_token or "0.A" + secrets.token_urlsafe(64)
        self.refresh_tokens[token] = Grant(client_id, resource, scope)
        return token

    def configure(self, changes: dict[str, Any]) -> None:
        if unknown := set(changes) - set(self.config):
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if changes.get("mode", "normal") not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if changes.get("refresh_token_mode", "strict") not in ("strict", "azure"):
            raise ValueError("refresh_token_mode must be strict or azure")
        for key in ("retry_after", "delay", "token_ttl"):
            if key in changes and (not isinstance(changes[key], int | float) or changes[key] < 0):
                raise ValueError(f"{key} must be a number >= 0")
        self.config.update(changes)
        if self.config["mode"] != "hold":
            self.release()

    def release(self) -> int:
        held, old = self.held, self.release_event
        self.release_event = asyncio.Event()
        old.set()
        return held

    def stats(self) -> dict[str, Any]:
        valid: dict[str, list[str]] = defaultdict(list)
        for token, grant in self.refresh_tokens.items():
            if not grant.used:
                valid[grant.client_id].append(token)
        keys = ("by_grant", "by_client", "refresh_by_client", "errors", "faults", "max_in_flight_by_client")
        keys += ("assertions",)
        names = ("token_calls", "reuse", "secret_in_authorize_url", "authorize_calls", "whoami_calls")
        return {
            **{name: self.totals[name] for name in names},
            **{key: dict(self.counters[key]) for key in keys},
            "valid_refresh_tokens": dict(valid),
            "in_flight": self.in_flight,
            "held": self.held,
            "max_in_flight": self.max_in_flight,
            "config": dict(self.config),
        }


def _state(request: Request) -> FakeIdpState:
    return request.app.state.fake  # type: ignore[no-any-return]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(claims: dict[str, Any]) -> str:
    head = {"typ": "JWT", "alg": "RS256", "kid": "fake-idp"}
    parts = [json.dumps(part, separators=(",", ":")).encode() for part in (head, claims)]
    return f"{_b64(parts[0])}.{_b64(parts[1])}.{secrets.token_urlsafe(32)}"


def _azure_error(
    request: Request, status: int, error: str, code: int, msg: str, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    trace, ts = str(uuid.uuid4()), datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    correlation = request.headers.get("client-request-id") or str(uuid.uuid4())
    _state(request).counters["errors"][error] += 1
    body = {
        "error": error,
        "error_description": f"AADSTS{code}: {msg}\r\nTrace ID: {trace}\r\n"
        f"Correlation ID: {correlation}\r\nTimestamp: {ts}",
        "error_codes": [code],
        "timestamp": ts,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
    return JSONResponse(body, status, headers={"Cache-Control": "no-store, no-cache", **(headers or {})})


def _bad_secret(request: Request, client_id: str) -> JSONResponse:
    return _azure_error(
        request, 401, "invalid_client", 7000215, "Invalid client secret provided. Ensure the secret being "
        "sent in the request is the client secret value, not the client secret ID, for a secret added to "
        f"app '{client_id}'.",
    )  # fmt: skip


def _invalid_grant(request: Request, code: int, message: str) -> JSONResponse:
    return _azure_error(request, 400, "invalid_grant", code, message)


NEEDS = {"refresh_token": "refresh_token", "authorization_code": "code", "client_credentials": "grant_type"}
EXPIRED = "The provided authorization code or refresh token has expired due to inactivity. Send a new "
EXPIRED += "interactive authorization request for this user and resource."


def _fault(request: Request, mode: str, client_id: str) -> Response | None:
    st = _state(request)
    if mode in TOKEN_MODES:
        st.counters["faults"][mode] += 1
    retry = {"Retry-After": str(int(st.config["retry_after"]))}
    if mode == "down":
        msg = "A transient error has occurred. Please try again."
        return _azure_error(request, 503, "temporarily_unavailable", 90033, msg, headers=retry)
    if mode == "throttle":
        msg = f"The request has been throttled. Too many requests; retry after {retry['Retry-After']} s."
        return _azure_error(request, 429, "temporarily_unavailable", 90055, msg, headers=retry)
    if mode == "garbage":
        return HTMLResponse(GARBAGE)
    return _bad_secret(request, client_id) if mode == "invalid_client" else None


def _issue(
    request: Request, client_id: str, resource: str, scope: str, *, refresh: bool, id_token: bool = False
) -> JSONResponse:
    st, tenant = _state(request), request.path_params["tenant"]
    v2, now, ttl = "/v2.0/" in request.url.path, int(time.time()), int(st.config["token_ttl"])
    audience = resource or next((s.rsplit("/", 1)[0] for s in scope.split() if "/" in s), "")
    claims = {"aud": audience, "iss": f"https://sts.windows.net/{tenant}/", "iat": now, "nbf": now}
    claims |= {"exp": now + ttl, "appid": client_id, "tid": tenant, "jti": secrets.token_urlsafe(8)}
    access = _jwt(claims)
    st.access_tokens[access] = (client_id, now + ttl)
    body: dict[str, Any] = {"token_type": "Bearer"}
    if v2:
        body |= ({"scope": scope} if refresh else {}) | {"expires_in": ttl, "ext_expires_in": ttl}
    else:
        body |= {"scope": "user_impersonation"} if refresh else {}
        body |= {"expires_in": str(ttl), "ext_expires_in": str(ttl), "expires_on": str(now + ttl)}
        body |= {"not_before": str(now), "resource": resource}
    body["access_token"] = access
    if refresh:
        body["refresh_token"] = st.add_refresh_token(client_id, resource=resource, scope=scope)
    if id_token:
        body["id_token"] = _jwt({"aud": client_id, "tid": tenant, "oid": str(uuid.uuid5(NS, client_id))})
    return JSONResponse(body, headers={"Cache-Control": "no-store, no-cache"})


def _refresh_grant(request: Request, form: dict[str, str], client_id: str) -> Response:
    st, token = _state(request), form.get("refresh_token", "")
    grant = st.refresh_tokens.get(token)
    if grant is None:
        return _invalid_grant(request, 70008, EXPIRED)
    if grant.client_id != client_id:
        return _invalid_grant(request, 70000, "Provided grant is invalid or malformed.")
    if grant.used:
        st.totals["reuse"] += 1
        return _invalid_grant(request, 70008, EXPIRED)
    grant.used = st.config["refresh_token_mode"] == "strict"
    resource, scope = form.get("resource") or grant.resource, form.get("scope") or grant.scope
    return _issue(request, client_id, resource, scope, refresh=True)


def _code_grant(request: Request, form: dict[str, str], client_id: str) -> Response:
    grant = _state(request).codes.get(form.get("code", ""))
    if grant is None or grant.client_id != client_id or grant.expires_at < time.time():
        return _invalid_grant(request, 9002313, "Invalid request. Request is malformed or invalid.")
    if grant.used:
        msg = "OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an "
        return _invalid_grant(request, 54005, msg + "existing refresh token.")
    if (given := form.get("redirect_uri", "")) != grant.redirect_uri:
        msg = f"The reply address '{given}' does not match the reply address '{grant.redirect_uri}' "
        return _invalid_grant(request, 500112, msg + "provided when requesting Authorization code.")
    if grant.challenge is not None:
        verifier = form.get("code_verifier", "")
        hashed = _b64(hashlib.sha256(verifier.encode()).digest()) if grant.method == "S256" else verifier
        if not verifier or hashed != grant.challenge:
            msg = "The Code_Verifier does not match the code_challenge supplied in the authorization request."
            return _invalid_grant(request, 501481, msg)
    grant.used = True
    v2 = "/v2.0/" in request.url.path
    id_token = not v2 or "openid" in grant.scope.split()
    return _issue(request, client_id, grant.resource, grant.scope, refresh=True, id_token=id_token)


async def token(request: Request) -> Response:
    st = _state(request)
    form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
    client_id, secret = form.get("client_id", ""), form.get("client_secret")
    if request.headers.get("authorization", "").startswith("Basic "):  # client_secret_basic
        with contextlib.suppress(ValueError):
            raw = base64.b64decode(request.headers["authorization"][6:], validate=True).decode()
            client_id, secret = (unquote_plus(part) for part in raw.partition(":")[::2])
    grant_type = form.get("grant_type", "")
    st.totals["token_calls"] += 1
    st.counters["by_grant"][grant_type] += 1
    st.counters["by_client"][client_id] += 1
    if grant_type == "refresh_token":
        st.counters["refresh_by_client"][client_id] += 1
    st.in_flight += 1
    st.in_flight_by_client[client_id] += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    top = st.counters["max_in_flight_by_client"]
    top[client_id] = max(top[client_id], st.in_flight_by_client[client_id])
    try:
        return await _token(request, form, client_id, secret)
    finally:
        st.in_flight -= 1
        st.in_flight_by_client[client_id] -= 1


def _client(request: Request, client_id: str) -> Client | None:
    """The registered client, if it lives in the tenant of the URL (or the URL says common/organizations)."""
    client, tenant = _state(request).clients.get(client_id), request.path_params["tenant"]
    if client is None or (client.tenant and tenant not in (client.tenant, "common", "organizations")):
        return None
    return client


ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FEDERATED_AUDIENCE = "api://AzureADTokenExchange"
MAX_ASSERTION_LIFETIME = 600


def _check_client(
    request: Request, client_id: str, secret: str | None, form: dict[str, str] | None = None
) -> Response | None:
    client, tenant = _client(request, client_id), request.path_params["tenant"]
    if client is None:
        msg = f"Application with identifier '{client_id}' was not found in the directory '{tenant}'."
        return _azure_error(request, 400, "unauthorized_client", 700016, msg)
    form = form or {}
    if "client_assertion" in form or "client_assertion_type" in form:
        if secret:
            msg = "Only one client credential may be presented: 'client_assertion' or 'client_secret'."
            return _azure_error(request, 401, "invalid_client", 7000219, msg)
        return _check_assertion(request, client, client_id, form)
    if client.confidential and not secret:
        msg = "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."
        return _azure_error(request, 401, "invalid_client", 7000218, msg)
    if client.secret is None and not client.confidential:
        return None
    return None if secret in (client.secret, *client.other_secrets) else _bad_secret(request, client_id)


def _check_assertion(  # noqa: PLR0911 - one return per refusal, as Azure lists them
    request: Request, client: Client, client_id: str, form: dict[str, str]
) -> Response | None:
    """Azure's checks of a client assertion: its type, then a certificate's signature and claims
    (x5t#S256 names a registered certificate), or a federated token's audience and subject."""
    st, assertion = _state(request), form.get("client_assertion", "")
    if form.get("client_assertion_type") != ASSERTION_TYPE or not assertion:
        msg = "The client_assertion_type or client_assertion is missing or not supported."
        return _azure_error(request, 400, "invalid_request", 50027, msg)
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError:
        return _azure_error(
            request, 401, "invalid_client", 50027, "Invalid JWT token. The token is malformed."
        )
    now = time.time()
    if "x5t#S256" not in header:
        return _check_federated(request, client, claims, now)
    key = client.certificates.get(header["x5t#S256"])
    if key is None or header.get("alg") != "PS256":
        msg = f"Client assertion contains an invalid signature. [Reason - The key was not found., Thumbprint of key used by client: '{header.get('x5t#S256')}']"  # noqa: E501
        return _azure_error(request, 401, "invalid_client", 700027, msg)
    audience = str(request.url.replace(query=""))
    try:
        claims = jwt.decode(
            assertion,
            key,
            algorithms=["PS256"],
            audience=audience,
            issuer=client_id,
            options={"require": ["aud", "iss", "sub", "jti", "exp", "nbf", "iat"]},
        )
    except jwt.ExpiredSignatureError:
        return _azure_error(
            request, 401, "invalid_client", 700024, "Client assertion is not within its valid time range."
        )
    except jwt.InvalidAudienceError:
        msg = f"The audience claim in the client assertion is invalid; expected '{audience}'."
        return _azure_error(request, 401, "invalid_client", 700211, msg)
    except jwt.PyJWTError as exc:
        return _azure_error(
            request, 401, "invalid_client", 700027, f"Client assertion failed validation: {exc}."
        )
    if claims["sub"] != client_id or claims["exp"] - claims["nbf"] > MAX_ASSERTION_LIFETIME:
        msg = "The client assertion's subject or lifetime is invalid."
        return _azure_error(request, 401, "invalid_client", 700023, msg)
    if claims["jti"] in st.assertion_ids:
        return _azure_error(request, 401, "invalid_client", 7000272, "The client assertion was already used.")
    st.assertion_ids.add(claims["jti"])
    st.counters["assertions"]["certificate"] += 1
    return None


def _check_federated(request: Request, client: Client, claims: dict[str, Any], now: float) -> Response | None:
    """A federated token (its signature is the cluster issuer's: not checked by the fake)."""
    if claims.get("aud") not in (FEDERATED_AUDIENCE, [FEDERATED_AUDIENCE]):
        msg = "No matching federated identity record found for presented assertion audience."
        return _azure_error(request, 400, "invalid_client", 700212, msg)
    if not isinstance(claims.get("exp"), int | float) or claims["exp"] <= now:
        return _azure_error(
            request, 401, "invalid_client", 700024, "Client assertion is not within its valid time range."
        )
    if claims.get("sub") not in client.federated_subjects:
        msg = "No matching federated identity record found for presented assertion subject "
        msg += f"'{claims.get('sub')}'."
        return _azure_error(request, 400, "invalid_client", 70021, msg)
    _state(request).counters["assertions"]["federated"] += 1
    return None


async def _token(request: Request, form: dict[str, str], client_id: str, secret: str | None) -> Response:
    st = _state(request)
    if st.config["mode"] == "hold":
        st.held += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(st.release_event.wait(), HOLD_LIMIT)
        st.held -= 1
    if st.config["mode"] == "slow":
        await asyncio.sleep(float(st.config["delay"]))
    if fault := _fault(request, st.config["mode"], client_id):
        return fault
    if problem := _check_client(request, client_id, secret, form):
        return problem
    grant_type = form.get("grant_type", "")
    if not form.get(needed := NEEDS.get(grant_type, "grant_type")):
        msg = f"The request body must contain the following parameter: '{needed}'."
        return _azure_error(request, 400, "invalid_request", 900144, msg)
    if grant := GRANTS.get(grant_type):
        return grant(request, form, client_id)
    msg = f"The provided value for the input parameter 'grant_type' is not valid: '{grant_type}'."
    return _azure_error(request, 400, "unsupported_grant_type", 70003, msg)


def _cc_grant(request: Request, form: dict[str, str], client_id: str) -> Response:
    scope = form.get("scope", "")
    if "/v2.0/" in request.url.path and not scope.endswith("/.default"):
        msg = f"The provided value for scope {scope} is not valid. Client credential flows must have a "
        msg += "scope value with /.default suffixed to the resource identifier (application ID URI)."
        return _azure_error(request, 400, "invalid_scope", 1002012, msg)
    return _issue(request, client_id, form.get("resource", ""), scope, refresh=False)


GRANTS = {"refresh_token": _refresh_grant, "authorization_code": _code_grant, "client_credentials": _cc_grant}


async def authorize(request: Request) -> Response:
    st, q = _state(request), request.query_params
    st.totals["authorize_calls"] += 1
    st.totals["secret_in_authorize_url"] += "client_secret" in q
    client_id, redirect_uri = q.get("client_id", ""), q.get("redirect_uri", "")
    if (client := _client(request, client_id)) is None:
        return HTMLResponse(f"<html><body>AADSTS700016: Application '{client_id}' not found</body>", 400)
    if not redirect_uri or (client.redirect_uris and redirect_uri not in client.redirect_uris):
        return HTMLResponse("<html><body>AADSTS50011: The redirect URI does not match.</body></html>", 400)
    if st.config["mode"] == "deny_authorize":
        error = {"error": "access_denied", "error_description": "AADSTS65004: User declined to consent."}
        return _back(redirect_uri, error, q.get("state"))
    if q.get("response_type") != "code":
        msg = f"AADSTS700054: response_type '{q.get('response_type')}' is not enabled for the application."
        error = {"error": "unsupported_response_type", "error_description": msg}
        return _back(redirect_uri, error, q.get("state"))
    code = "1.A" + secrets.token_urlsafe(48)
    st.codes[code] = Grant(
        client_id, q.get("resource", ""), q.get("scope", ""), redirect_uri=redirect_uri,
        challenge=q.get("code_challenge"), method=q.get("code_challenge_method", "plain"),
        expires_at=time.time() + 600,
    )  # fmt: skip
    return _back(redirect_uri, {"code": code}, q.get("state"), {"session_state": str(uuid.uuid4())})


def _back(uri: str, first: dict[str, str], state: str | None, last: dict[str, str] | None = None) -> Response:
    params = first | ({"state": state} if state is not None else {}) | (last or {})
    return RedirectResponse(uri + ("&" if "?" in uri else "?") + urlencode(params), status_code=302)


async def whoami(request: Request) -> Response:
    if not request.url.path.endswith("/WhoAmI"):
        return JSONResponse({"error": {"code": "0x80060888", "message": "Resource not found."}}, 404)
    st, base = _state(request), f"{request.url.scheme}://{request.url.netloc}"
    st.totals["whoami_calls"] += 1
    auth = request.headers.get("authorization", "")
    known = st.access_tokens.get(auth[7:]) if auth[:7].lower() == "bearer " else None
    if known is None or known[1] <= time.time():
        login = "https://login.microsoftonline.com/common/oauth2/authorize"
        return Response(status_code=401, headers={"WWW-Authenticate": f"Bearer authorization_uri={login}"})
    if st.config["mode"] == "whoami_forbidden":
        msg = "The user is not a member of the organization."
        return JSONResponse({"error": {"code": "0x80072560", "message": msg}}, 403)
    return JSONResponse(
        {
            "@odata.context": f"{base}/api/data/v9.2/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse",
            "BusinessUnitId": str(uuid.uuid5(NS, "business-unit")),
            "UserId": str(uuid.uuid5(NS, known[0])),
            "OrganizationId": str(uuid.uuid5(NS, "organization")),
        }
    )


CLIENT_KEYS = ("client_id", "client_secret", "tenant", "redirect_uris", "other_secrets", "certificates")
CLIENT_KEYS += ("federated_subjects",)
TOKEN_KEYS = ("client_id", "refresh_token", "resource", "scope")


def _pick(body: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: body[key] for key in keys if key in body}


async def control(request: Request) -> Response:
    st, action = _state(request), request.path_params["action"]
    answer: dict[str, Any]
    try:
        body = await request.json() if request.method == "POST" and await request.body() else {}
        if action == "clients":
            answer = {"registered": st.add_client(**_pick(body, CLIENT_KEYS))}
        elif action == "refresh_tokens":
            answer = {"refresh_token": st.add_refresh_token(**_pick(body, TOKEN_KEYS))}
        elif action == "mode":
            st.configure(body)
            answer = dict(st.config)
        elif action == "release":
            answer = {"released": st.release()}
        elif action in ("reset", "stats"):
            if action == "reset":
                st.reset_stats()
            answer = st.stats()
        else:
            return JSONResponse({"error": f"unknown control action {action!r}"}, 404)
    except (ValueError, TypeError, KeyError) as exc:
        return JSONResponse({"error": f"{type(exc).__name__}: {exc}"}, 400)
    return JSONResponse(answer)


def build_app(state: FakeIdpState | None = None) -> Starlette:
    """The fake as an ASGI app; pass a ``FakeIdpState`` to inspect or seed it directly."""
    app = Starlette(
        routes=[
            Route("/_control/{action}", control, methods=["GET", "POST"]),
            Route("/{tenant}/oauth2/token", token, methods=["POST"]),
            Route("/{tenant}/oauth2/v2.0/token", token, methods=["POST"]),
            Route("/{tenant}/oauth2/authorize", authorize, methods=["GET"]),
            Route("/{tenant}/oauth2/v2.0/authorize", authorize, methods=["GET"]),
            Route("/{path:path}", whoami, methods=["GET"]),
        ]
    )
    app.state.fake = state if state is not None else FakeIdpState()
    return app


async def serve(host: str, port: int, **settings: Any) -> None:
    """Listen on host:port (0: any free port), print READY with the real URL, serve until signalled."""
    await fake_process.serve(build_app(FakeIdpState(**settings)), fake_process.listening_socket(host, port))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.fake_idp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-ttl", type=int, default=3599)
    parser.add_argument("--refresh-token-mode", choices=("strict", "azure"), default="strict")
    args = parser.parse_args(argv)
    config = {"token_ttl": args.token_ttl, "refresh_token_mode": args.refresh_token_mode}
    asyncio.run(serve(args.host, args.port, **config))


@dataclass
class FakeIdpHandle:
    url: str
    process: subprocess.Popen[bytes]
    client: httpx.Client

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def control(self, path: str, json: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST ``json`` to ``/_control/<path>`` ("mode", "clients", ...) and return the JSON answer."""
        path = path if path.startswith("/_control/") else "/_control/" + path.lstrip("/")
        response = self.client.post(path, json=json or {})
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/_control/stats")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]


def account_body(
    fake_url: str,
    *,
    tenant: str,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    v2: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """A ``POST /accounts`` body whose URLs point at this fake (v1 endpoints, or v2 with ``v2``)."""
    fields: dict[str, Any] = {
        "tenant_id": tenant,
        "client_id": client_id,
        "client_secret": client_secret,
        "refresh_token": refresh_token,
        **helpers.fake_urls(fake_url, tenant=tenant, v2=v2),
        **extra,  # the caller's values win, the URLs included
    }
    return helpers.account_body(**fields)


@contextlib.contextmanager
def running_fake_idp(
    *, clients: Any = (), refresh_tokens: Any = (), ready_timeout: float = 20.0, **mode: Any
) -> Iterator[FakeIdpHandle]:
    """Run the fake in a subprocess; seed ``clients``/``refresh_tokens`` (control bodies) and ``mode``."""
    command = fake_process.module_command("tests.fake_idp")
    with (
        fake_process.running(command, name="fake IdP", ready_timeout=ready_timeout) as (url, proc),
        httpx.Client(base_url=url, timeout=10.0, trust_env=False) as client,
    ):
        handle = FakeIdpHandle(url, proc, client)
        for body in clients:
            handle.control("clients", body)
        for body in refresh_tokens:
            handle.control("refresh_tokens", body)
        if mode:
            handle.control("mode", mode)
        yield handle


if __name__ == "__main__":
    main()
