"""What the sync and async credentials share: the caller's key, scope checks, response parsing."""

from __future__ import annotations

import email.utils
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError

__version__ = "0.1.0"

logger = logging.getLogger("dynamics_token_broker_client")

DEFAULT_TIMEOUT = 40.0  # the broker lets a caller wait up to 30 s (BROKER_MAX_WAIT_SECONDS) by default
CONNECT_TIMEOUT = 5.0
MAX_MIN_TTL = 3600  # the broker's upper bound for ?min_ttl
# When the broker says refresh_in=0 (it is refreshing in the background and serves the old token
# meanwhile), ask again after this many seconds rather than on every call.
STALE_HOLD_SECONDS = 5.0
_ACCEPTED_SCOPE_PATHS = ("", "/", "/.default", "/user_impersonation")
_DEFAULT_PORTS = {"https": 443, "http": 80}


class BrokerAuthenticationError(ClientAuthenticationError):
    """The broker refused (401/403/404/409...): a person must act, retrying will not help.

    ``code`` is the broker's stable problem code (``needs_authorization``, ``invalid_credentials``,
    ``account_not_found``, ...), ``detail`` says what to do, ``status`` is the HTTP status.
    """

    def __init__(self, message: str, *, code: str | None = None, detail: str | None = None, status: int = 0):
        super().__init__(message=message)
        self.code = code
        self.detail = detail
        self.status = status


class BrokerUnavailableError(ServiceRequestError):
    """The broker, or Azure AD behind it, cannot give a token right now: retry after ``retry_after`` s."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        code: str | None = None,
        detail: str | None = None,
        status: int = 0,
    ):
        super().__init__(message=message)
        self.retry_after = retry_after
        self.code = code
        self.detail = detail
        self.status = status


def origin(url: str) -> str:
    """``scheme://host[:port]``, lower case, without the scheme's default port ('' if not a URL)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return ""
    if parts.scheme.lower() not in _DEFAULT_PORTS or not parts.hostname:
        return ""
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}" if port in (None, _DEFAULT_PORTS[scheme]) else f"{scheme}://{host}:{port}"


def check_scopes(scopes: tuple[str, ...], api_url: str | None) -> None:
    """Every scope names the account's Dynamics origin (``<origin>/.default``, ``/user_impersonation``
    or the bare origin); with ``api_url`` None only the form is checked."""
    if not scopes:
        raise ClientAuthenticationError(
            message="get_token needs a scope, e.g. 'https://contoso.crm.dynamics.com/.default'."
        )
    expected = origin(api_url) if api_url else None
    for scope in scopes:
        found = origin(scope)
        path = urlsplit(scope.strip()).path if found else ""
        if not found or path not in _ACCEPTED_SCOPE_PATHS:
            raise ClientAuthenticationError(
                message=f"Scope {scope!r} is not a Dynamics 365 scope: use '<organization URL>/.default'."
            )
        if expected is not None and found != expected:
            raise ClientAuthenticationError(
                message=(
                    f"Scope {scope!r} does not name this account's Dynamics organization {expected}: "
                    "the token broker account serves only that API. Use a credential for the account "
                    f"of {found}, or the scope '{expected}/.default'."
                )
            )


class KeySource:
    """The caller's broker key: a literal, or a file re-read whenever it changes (kubelet rotation)."""

    def __init__(self, key: str | None, key_file: str | None, service_account_token_file: str | None) -> None:
        given = [v for v in (key, key_file, service_account_token_file) if v is not None]
        if len(given) != 1:
            raise ValueError("Pass exactly one of key, key_file or service_account_token_file.")
        self._literal = key.strip() if key is not None else None
        if self._literal is not None and not self._literal:
            raise ValueError("key is empty.")
        self.path = key_file if key_file is not None else service_account_token_file
        self.kind = (
            "key" if key is not None else "key_file" if key_file is not None else "service_account_token_file"
        )
        self._stamp: tuple[int, int, int] | None = None
        self._value = ""

    def describe(self) -> str:
        return "key=<hidden>" if self.path is None else f"{self.kind}={self.path!r}"

    def value(self) -> str:
        if self._literal is not None:
            return self._literal
        assert self.path is not None
        try:
            st = os.stat(self.path)  # follows the symlinks kubelet swaps on rotation
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                with open(self.path, encoding="utf-8") as handle:
                    value = handle.read().strip()
                self._stamp, self._value = stamp, value
                logger.debug("read the broker key from %s", self.path)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ClientAuthenticationError(
                message=f"Cannot read the token broker key from {self.path}: {reason}."
            ) from None
        if not self._value:
            raise ClientAuthenticationError(message=f"The token broker key file {self.path} is empty.")
        return self._value


@dataclass(frozen=True)
class Entry:
    """One token from the broker, kept in memory until ``refresh_on``."""

    token: str = field(repr=False)
    expires_on: int
    refresh_on: int
    hold_until: float  # refresh_on, or a few seconds when the broker is refreshing right now
    api_url: str

    def fresh(self, now: float) -> bool:
        return now < self.hold_until and now < self.expires_on

    def access_token(self) -> AccessToken:
        return AccessToken(self.token, self.expires_on)

    def info(self) -> AccessTokenInfo:
        return AccessTokenInfo(self.token, self.expires_on, refresh_on=self.refresh_on)  # type Bearer


class Endpoint:
    """The broker's token URL for one account, the request headers, and the response mapping."""

    def __init__(self, broker_url: str, account_id: str, keys: KeySource) -> None:
        if not origin(broker_url):
            raise ValueError(f"broker_url must be an http(s) URL, got {broker_url!r}.")
        if not account_id:
            raise ValueError("account_id is required (or 'default').")
        self.broker_url = broker_url.rstrip("/")
        self.account_id = account_id
        self.url = f"{self.broker_url}/accounts/{quote(account_id, safe='')}/token"
        self.keys = keys

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys.value()}", "Accept": "application/json"}

    @staticmethod
    def params(min_ttl: int) -> dict[str, int]:
        return {"min_ttl": min_ttl} if min_ttl else {}

    def network_error(self, exc: httpx.HTTPError) -> BrokerUnavailableError:
        return BrokerUnavailableError(
            f"Could not reach the token broker at {self.broker_url} ({type(exc).__name__}); retry later."
        )

    def parse(self, response: httpx.Response, now: float) -> Entry:
        if response.status_code == 200:
            return self._entry(response, now)
        body = _json(response)
        code = _text(body.get("code"))
        detail = _text(body.get("detail")) or _text(body.get("title"))
        status = response.status_code
        what = f"account {self.account_id!r}"
        if status == 429 or status >= 500:
            retry_after = _retry_after(response, now)
            wait = f" Retry after {retry_after:g} s." if retry_after is not None else " Retry later."
            raise BrokerUnavailableError(
                f"The token broker cannot give a token for {what} right now (HTTP {status}"
                f"{', ' + code if code else ''}): {detail or response.reason_phrase}.{wait}",
                retry_after=retry_after,
                code=code,
                detail=detail,
                status=status,
            )
        if status == 401:
            detail = detail or "The broker key was not accepted."
        raise BrokerAuthenticationError(
            f"The token broker refused a token for {what} (HTTP {status}"
            f"{', ' + code if code else ''}): {detail or response.reason_phrase}",
            code=code,
            detail=detail,
            status=status,
        )

    def _entry(self, response: httpx.Response, now: float) -> Entry:
        body = _json(response)
        token, expires_in = body.get("access_token"), body.get("expires_in")
        api_url = body.get("api_url")
        if not isinstance(token, str) or not token or not isinstance(expires_in, int):
            raise BrokerUnavailableError(
                f"The token broker at {self.broker_url} answered 200 without a usable token; retry later."
            )
        refresh_in = body.get("refresh_in")
        if not isinstance(refresh_in, int):  # a broker from before refresh_in: keep it half its life
            refresh_in = max(0, expires_in // 2)
        refresh_in = max(0, min(refresh_in, expires_in))
        expires_on = int(now) + expires_in
        refresh_on = int(now) + refresh_in
        hold = max(float(refresh_on), now + min(STALE_HOLD_SECONDS, expires_in / 2))
        logger.debug(
            "token for account %s from the broker: expires_in=%d refresh_in=%d",
            self.account_id,
            expires_in,
            refresh_in,
        )
        return Entry(token, expires_on, refresh_on, hold, api_url if isinstance(api_url, str) else "")


def forced_min_ttl(entry: Entry | None, now: float) -> int:
    """A ``min_ttl`` that makes the broker replace ``entry`` (for a claims challenge)."""
    if entry is None:
        return MAX_MIN_TTL
    return max(1, min(MAX_MIN_TTL, int(entry.expires_on - now) + 1))


def claims_of(options: Any) -> str | None:
    if not options:
        return None
    claims = options.get("claims")
    return claims if isinstance(claims, str) and claims.strip() else None


def now() -> float:
    return time.time()


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _retry_after(response: httpx.Response, now: float) -> float | None:
    header = response.headers.get("retry-after", "").strip()
    if header.isdigit():
        return float(header)
    if header:
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    value = _json(response).get("retry_after")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
