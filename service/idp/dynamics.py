"""The Dynamics Web API ``WhoAmI`` probe behind "test connection", answered in plain words.

Invariant: ``who_am_i`` never raises for anything Dynamics or the network does. It makes at most
one request, to a URL the ``OutboundPolicy`` allows, with a bounded timeout and redirects never
followed, and returns either a ``WhoAmI`` or a ``ConnectionProblem`` whose message says what a
person must fix. The access token never appears in a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

import httpx

from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.kit.transport import UnsendableURL, send

Reason = Literal[
    "unauthorized", "forbidden", "not_found", "unreachable", "bad_response", "server_error", "forbidden_url"
]

_FIELDS = ("UserId", "OrganizationId", "BusinessUnitId")
_MESSAGES: dict[int, tuple[Reason, str]] = {
    401: (
        "unauthorized",
        "Dynamics rejected the token: the API URL's origin must be the resource the app was "
        "authorized for; check api_url",
    ),
    403: (
        "forbidden",
        "The application user lacks a security role in Dynamics: assign one "
        "(integration guide step 2.7/2.13)",
    ),
    404: ("not_found", "Dynamics has no Web API at this URL: check api_url's path, e.g. /api/data/v9.2"),
}


@dataclass(frozen=True)
class WhoAmI:
    user_id: str
    organization_id: str
    business_unit_id: str
    latency_ms: float


@dataclass(frozen=True)
class ConnectionProblem:
    reason: Reason
    message: str  # plain words: what a person must do
    status: int | None  # Dynamics' HTTP status, None when no answer came


async def who_am_i(
    http: httpx.AsyncClient,
    policy: OutboundPolicy,
    *,
    api_url: str,
    access_token: str,
    timeout: float,  # noqa: ASYNC109 -- httpx's per-request limit, part of the contract
) -> WhoAmI | ConnectionProblem:
    """Call ``GET {api_url}/WhoAmI`` with the token and classify the answer."""
    url = f"{api_url.rstrip('/')}/WhoAmI"
    try:
        policy.check(url)
    except OutboundURLError as exc:
        return ConnectionProblem("forbidden_url", f"api_url cannot be called ({exc}); fix api_url", None)
    headers = {
        "Authorization": f"Bearer {access_token}",
        "Accept": "application/json",
        "OData-MaxVersion": "4.0",
        "OData-Version": "4.0",
    }
    host = urlsplit(url).hostname
    started = time.perf_counter()
    try:
        response = await send(http, "GET", url, limit=timeout, headers=headers)
    except UnsendableURL:
        return ConnectionProblem("forbidden_url", "api_url is not a valid URL; fix api_url", None)
    except httpx.TimeoutException:
        message = f"Dynamics at {host} did not answer within {timeout:g}s; check api_url and try again"
        return ConnectionProblem("unreachable", message, None)
    except httpx.TransportError as exc:
        message = f"Could not reach Dynamics at {host} ({type(exc).__name__}); check api_url and the network"
        return ConnectionProblem("unreachable", message, None)
    except httpx.HTTPError as exc:
        message = f"Dynamics' answer could not be read ({type(exc).__name__}); try again later"
        return ConnectionProblem("bad_response", message, None)
    return _classify(response, (time.perf_counter() - started) * 1000.0)


def _classify(response: httpx.Response, latency_ms: float) -> WhoAmI | ConnectionProblem:
    status = response.status_code
    if status == 200:
        try:
            body = response.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            body = None
        ids = [body.get(k) if isinstance(body, dict) else None for k in _FIELDS]
        if all(isinstance(v, str) and v for v in ids):
            user, org, unit = (str(v) for v in ids)
            return WhoAmI(user, org, unit, latency_ms)
        message = "Dynamics answered WhoAmI without UserId/OrganizationId/BusinessUnitId; check api_url"
        return ConnectionProblem("bad_response", message, status)
    if status in _MESSAGES:
        reason, message = _MESSAGES[status]
        return ConnectionProblem(reason, message, status)
    if status == 429 or status >= 500:
        what = "is throttling requests" if status == 429 else "failed"
        return ConnectionProblem("server_error", f"Dynamics {what} (HTTP {status}); try again later", status)
    if 300 <= status < 400:
        message = f"Dynamics answered with a redirect (HTTP {status}), never followed; check api_url"
        return ConnectionProblem("bad_response", message, status)
    return ConnectionProblem("bad_response", f"Dynamics answered HTTP {status}; check api_url", status)
