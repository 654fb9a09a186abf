"""Azure AD (Microsoft identity platform) client: the authorize URL and the three token grants.

Invariants:
- each grant makes one HTTP request (``transport.send``: sent once more only when a kept-alive
  connection drops under it; and once more with the previous client secret when Azure refuses a
  newly replaced one as ``invalid_client``, as it does while a new secret propagates), to a URL
  the ``OutboundPolicy`` allows (checked before every call),
  with a bounded timeout and redirects never followed; policy retries belong to the broker;
- httpx exceptions are translated in one funnel (``_send_grant``) and Azure's answers classified in
  one place (``_classify``): callers get a ``TokenGrant`` or an ``errors`` kind, nothing foreign;
- no message carries a secret: details are built from OAuth error codes and Azure's sanitised
  description, in which every secret value we sent is replaced by "[redacted]";
- an account authenticates with exactly one credential per request: a client secret, or a
  client assertion (certificate or federated token) built for that request, never both;
- the authorize URL never carries the client secret (the seed's example does: it leaks into
  browser history and proxy logs).
The URL's path decides the endpoint style: ``/oauth2/v2.0/`` is v2 (``scope``), else v1
(``resource``); v1 sends ``expires_in`` as a string, v2 as a number.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Literal, NamedTuple, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit

import httpx

from service import errors
from service.idp.redaction import sanitize_description
from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.kit.transport import UnsendableURL, send

# Form fields whose values are secret; anything Azure echoes back has them redacted.
_SECRET_FIELDS = ("client_secret", "client_assertion", "refresh_token", "code", "code_verifier")
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
# Dropped from a configured authorize URL's query: the ones we set, and the seed's leaky extras.
_DROPPED_PARAMS = frozenset(
    {"response_type", "client_id", "redirect_uri", "state", "resource", "scope", "code_challenge"}
    | {"code_challenge_method", "client_secret", "grant_type", "redirect_url"}
)
# The grant (refresh token, code, consent) is gone: only a person signing in again helps.
_NEEDS_AUTHORIZATION = frozenset(
    {"invalid_grant", "interaction_required", "consent_required", "login_required"}
)
# Wrong or expired client secret (AADSTS7000215, 7000222), or an app id unknown to the tenant.
_BAD_CLIENT = frozenset({"invalid_client", "unauthorized_client"})
# Any other 4xx OAuth error means the account's configuration is wrong (resource, URL, tenant):
# retrying cannot help and a person must edit the account, so it is InvalidCredentials too, with
# the fields most likely at fault named in the detail.
_CONFIG_HINTS = {
    "invalid_resource": "api_url (its origin must be the Dynamics resource the app may call)",
    "invalid_scope": "api_url (its origin makes the scope)",
    "unsupported_grant_type": "token_url (the tenant's v1 or v2 token endpoint)",
}
# AADSTS codes worth naming in plain words (Azure's own description goes to idp_message).
_AADSTS = {
    70008: "expired",
    700082: "expired after 90 days without use",
    50173: "the grant was revoked, e.g. after a password change",
    70043: "expired or invalid under a Conditional Access policy",
    65001: "consent was not granted to the application",
    54005: "the authorization code was already redeemed",
    7000215: "invalid client secret",
    7000222: "the client secret expired",
    700027: "the client assertion's signature does not match a certificate of the app",
    700024: "the client assertion is not within its valid time range",
    70021: "no federated credential of the app matches the presented token",
    700016: "the application was not found in the tenant",
    500011: "the API URL's origin is not a resource known to this tenant",
}
_AADSTS_IN_TEXT = re.compile(r"AADSTS(\d+)")
_MAX_RETRY_AFTER = 300.0
_ACCEPT_JSON = {"Accept": "application/json"}


class ClientAssertion(Protocol):
    """Makes the ``client_assertion`` of one token request (raises ``InvalidCredentials``)."""

    def assertion(self, audience: str, now: float) -> str: ...


@dataclass(frozen=True)
class ClientCredentials:
    tenant_id: str
    client_id: str
    client_secret: str | None = field(repr=False)  # never in a repr
    token_url: str
    authorization_url: str
    api_url: str
    # Certificate or federated token: asked for a new assertion for every request (fresh jti/exp).
    assertion: ClientAssertion | None = None
    # The secret a PATCH replaced, tried when Azure refuses the new one as invalid_client.
    previous_client_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TokenGrant:
    access_token: str = field(repr=False)
    expires_at: float  # unix seconds, counted from before the request was sent
    refresh_token: str | None = field(repr=False)  # None: Azure sent none, the caller keeps the old one
    token_type: str
    used_previous_secret: bool = False  # Azure refused the new secret, accepted the previous one


def endpoint_style(url: str) -> Literal["v1", "v2"]:
    """v2 when the URL's path contains ``/oauth2/v2.0/``, else v1."""
    return "v2" if "/oauth2/v2.0/" in urlsplit(url).path.lower() else "v1"


def resource_of(api_url: str) -> str:
    """The API URL's origin (scheme://host[:port], port only if non-default); ValueError if none."""
    parts = urlsplit(api_url.strip())
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("https", "http") or not host:
        raise ValueError("is not an absolute http(s) URL")
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" if port in (None, default) else f"{scheme}://{host}:{port}"


def _retry_after(value: str | None, *, default: float, now: float) -> float:
    """Retry-After as seconds (delta or HTTP-date), capped; ``default`` when absent or garbage."""
    if not value:
        return default
    try:
        seconds = float(value.strip())
    except ValueError:
        try:
            when = parsedate_to_datetime(value.strip())
        except (TypeError, ValueError, IndexError):
            return default
        seconds = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp() - now
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER)


def _positive_int(value: object) -> int | None:
    """A positive whole number of seconds from a JSON number or a digit string, else None."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return int(value) if value >= 1 else None


def _parse_grant(body: object, sent_at: float) -> TokenGrant | None:
    if not isinstance(body, dict):
        return None
    access, refresh, kind = (body.get(k) for k in ("access_token", "refresh_token", "token_type"))
    kind = "Bearer" if kind is None else kind
    if not (isinstance(access, str) and access and isinstance(kind, str) and isinstance(refresh, str | None)):
        return None
    if (lifetime := _positive_int(body.get("expires_in"))) is not None:
        return TokenGrant(access, sent_at + lifetime, refresh or None, kind)
    if (expires_on := _positive_int(body.get("expires_on"))) is not None:  # v1: absolute unix seconds
        return TokenGrant(access, float(expires_on), refresh or None, kind)
    return None


class _OAuthError(NamedTuple):
    error: str  # e.g. invalid_grant
    why: str  # e.g. "AADSTS70008: expired"
    description: str  # Azure's, sanitised


def _oauth_error(response: httpx.Response, secrets: list[str]) -> _OAuthError | None:
    try:
        body = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    if not isinstance(body, dict) or not isinstance(body.get("error"), str) or not body["error"]:
        return None
    error = sanitize_description(body["error"], secrets)[:64]
    text = body.get("error_description")
    text = sanitize_description(text if isinstance(text, str) else "", secrets)
    codes = body.get("error_codes")
    if isinstance(codes, list) and codes and type(codes[0]) is int:
        return _OAuthError(error, f"AADSTS{codes[0]}: {_AADSTS.get(codes[0], error)}", text)
    if match := _AADSTS_IN_TEXT.search(text):
        return _OAuthError(error, f"AADSTS{match[1]}: {_AADSTS.get(int(match[1]), error)}", text)
    return _OAuthError(error, error, text)


def _action_required(oauth: _OAuthError, grant_type: str) -> errors.ActionRequired:
    kw = {"idp_code": oauth.error, "idp_message": oauth.description or None}
    if oauth.error in _NEEDS_AUTHORIZATION:
        again = "authorize the account again (POST /accounts/{id}/authorize)"
        if grant_type == "refresh_token":
            detail = f"Azure AD no longer accepts this account's refresh token ({oauth.why}); {again}"
        elif grant_type == "authorization_code":
            detail = f"Azure AD rejected the authorization code ({oauth.why}); {again}"
        else:  # client_credentials: there is no user to sign in, an admin must consent
            detail = f"Azure AD refused the application ({oauth.why}); an admin must grant the app consent"
        return errors.NeedsAuthorization(detail, **kw)
    if oauth.error in _BAD_CLIENT:
        detail = (
            f"Azure AD rejected the client id or credential ({oauth.why}); "
            "fix client_secret, certificate or the app's federated credential (or client_id)"
        )
        return errors.InvalidCredentials(detail, **kw)
    hint = _CONFIG_HINTS.get(oauth.error, "tenant_id, token_url and api_url")
    detail = f"Azure AD rejected the account's configuration ({oauth.why}); check {hint}"
    return errors.InvalidCredentials(detail, **kw)


class AzureADClient:
    """Talks to one tenant's token endpoint per call; shares the app's long-lived ``http``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        policy: OutboundPolicy,
        *,
        timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._policy = policy
        self._timeout = timeout
        self._clock = clock

    def authorization_url(
        self, creds: ClientCredentials, *, redirect_uri: str, state: str, code_challenge: str
    ) -> str:
        """The URL a person opens to sign in (PKCE S256); never carries the client secret."""
        base, _, query = creds.authorization_url.partition("?")
        kept = [
            (k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() not in _DROPPED_PARAMS
        ]
        params = {"response_type": "code", "client_id": creds.client_id, "redirect_uri": redirect_uri}
        params |= {"state": state, **self._target(creds, creds.authorization_url, offline=True)}
        params |= {"code_challenge": code_challenge, "code_challenge_method": "S256"}
        return self._allowed(f"{base}?{urlencode([*kept, *params.items()])}", "authorization_url")

    async def refresh(self, creds: ClientCredentials, refresh_token: str) -> TokenGrant:
        form = {"grant_type": "refresh_token", "client_id": creds.client_id, "refresh_token": refresh_token}
        return await self._post_token(creds, self._complete(creds, form, offline=True))

    async def client_credentials(self, creds: ClientCredentials) -> TokenGrant:
        if not creds.client_secret and creds.assertion is None:
            raise errors.InvalidCredentials(
                "client_credentials needs a client secret or a certificate; set client_secret or certificate"
            )
        form = {"grant_type": "client_credentials", "client_id": creds.client_id}
        return await self._post_token(creds, self._complete(creds, form, offline=False))

    async def redeem_code(
        self, creds: ClientCredentials, *, code: str, redirect_uri: str, code_verifier: str | None
    ) -> TokenGrant:
        form = {"grant_type": "authorization_code", "client_id": creds.client_id, "code": code}
        form["redirect_uri"] = redirect_uri
        if code_verifier:
            form["code_verifier"] = code_verifier
        return await self._post_token(creds, self._complete(creds, form, offline=True))

    def _allowed(self, url: str, name: str) -> str:
        try:
            return self._policy.check(url)
        except OutboundURLError as exc:
            raise errors.InvalidCredentials(
                f"The account's {name} cannot be called ({exc}); fix {name}"
            ) from exc

    def _target(self, creds: ClientCredentials, url: str, *, offline: bool) -> dict[str, str]:
        """v1 names the resource; v2 asks for the resource's ``.default`` scope."""
        # Checked like token_url, before every grant: an api_url written straight into the seed
        # table must not get a token for another resource (e.g. Microsoft Graph) minted and served.
        self._allowed(creds.api_url, "api_url")
        try:
            origin = resource_of(creds.api_url)
        except ValueError as exc:
            raise errors.InvalidCredentials(f"The account's api_url {exc}; fix api_url") from exc
        if endpoint_style(url) == "v1":
            return {"resource": origin}
        return {"scope": f"{origin}/.default offline_access" if offline else f"{origin}/.default"}

    def _complete(self, creds: ClientCredentials, form: dict[str, str], *, offline: bool) -> dict[str, str]:
        if creds.assertion is None and creds.client_secret:
            form["client_secret"] = creds.client_secret
        return form | self._target(creds, creds.token_url, offline=offline)

    async def _post_token(self, creds: ClientCredentials, form: Mapping[str, str]) -> TokenGrant:
        """Send the grant with the account's credential; a replaced secret Azure does not accept
        yet (``invalid_client``) is retried once with the previous one."""
        previous = creds.previous_client_secret
        try:
            return await self._send_grant(creds, self._authenticated(creds, form))
        except errors.InvalidCredentials as exc:
            if not (previous and "client_secret" in form and exc.idp_code in _BAD_CLIENT):
                raise
        grant = await self._send_grant(creds, {**form, "client_secret": previous})
        return dataclasses.replace(grant, used_previous_secret=True)

    def _authenticated(self, creds: ClientCredentials, form: Mapping[str, str]) -> Mapping[str, str]:
        """The form with a client assertion made for this request (none is ever reused)."""
        if creds.assertion is None:
            return form
        assertion = creds.assertion.assertion(creds.token_url, self._clock())
        return {**form, "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion}

    async def _send_grant(self, creds: ClientCredentials, form: Mapping[str, str]) -> TokenGrant:
        """The one place that sends a grant and translates httpx's exceptions."""
        url = self._allowed(creds.token_url, "token_url")
        secrets = [form[k] for k in _SECRET_FIELDS if form.get(k)]
        sent_at = self._clock()
        try:
            response = await send(
                self._http, "POST", url, limit=self._timeout, headers=_ACCEPT_JSON, data=form
            )
        except UnsendableURL as exc:
            raise errors.InvalidCredentials("token_url is not a valid URL; fix token_url") from exc
        except httpx.TimeoutException as exc:
            detail = f"Azure AD did not answer within {self._timeout:g}s ({type(exc).__name__}); try again"
            raise errors.UpstreamUnavailable(detail, reason="timeout") from exc
        except httpx.TransportError as exc:
            detail = f"Could not reach Azure AD ({type(exc).__name__}); check the network and token_url"
            raise errors.UpstreamUnavailable(detail, reason="network") from exc
        except httpx.HTTPError as exc:
            detail = f"Azure AD's answer could not be read ({type(exc).__name__})"
            raise errors.UpstreamUnavailable(detail, reason="bad_response") from exc
        return self._classify(response, sent_at=sent_at, grant_type=form["grant_type"], secrets=secrets)

    def _classify(
        self, response: httpx.Response, *, sent_at: float, grant_type: str, secrets: list[str]
    ) -> TokenGrant:
        """Azure's answer as a TokenGrant, or the error kind that says who must act."""
        status = response.status_code
        if status == 200:
            try:
                grant = _parse_grant(response.json(), sent_at)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                grant = None
            if grant is None:
                detail = "Azure AD answered HTTP 200 without a usable access_token and lifetime"
                raise errors.UpstreamUnavailable(detail, reason="bad_response")
            return grant
        if 300 <= status < 400:
            detail = f"Azure AD answered with a redirect (HTTP {status}), never followed; check token_url"
            raise errors.UpstreamUnavailable(detail, reason="redirect")
        oauth = _oauth_error(response, secrets)
        idp_code = oauth.error if oauth else None
        if status == 429 or status >= 500 or (oauth and oauth.error == "temporarily_unavailable"):
            throttled = status == 429
            wait = _retry_after(
                response.headers.get("Retry-After"), default=5.0 if throttled else 1.0, now=self._clock()
            )
            what = "is throttling requests" if throttled else "failed"
            detail = f"Azure AD {what} (HTTP {status}{', ' + oauth.why if oauth else ''}); try again later"
            reason = "throttled" if throttled else "server_error"
            raise errors.UpstreamUnavailable(detail, reason=reason, retry_after=wait, idp_code=idp_code)
        if 400 <= status < 500 and oauth is not None:
            raise _action_required(oauth, grant_type)
        detail = f"Azure AD answered HTTP {status} without an OAuth error; check token_url"
        raise errors.UpstreamUnavailable(detail, reason="bad_response")
