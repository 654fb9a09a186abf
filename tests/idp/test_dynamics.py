"""The Dynamics WhoAmI probe: the request it sends and every answer classified in plain words."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import respx

from service.idp.dynamics import ConnectionProblem, WhoAmI, who_am_i
from service.kit.outbound import OutboundPolicy

API_URL = "https://org.crm.dynamics.com/api/data/v9.2"
WHOAMI = f"{API_URL}/WhoAmI"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.secret-access-token"
POLICY = OutboundPolicy(allowed_hosts=["*.crm.dynamics.com"])
IDS = {
    "BusinessUnitId": "b1b2b3b4-0000-0000-0000-000000000001",
    "UserId": "a1a2a3a4-0000-0000-0000-000000000002",
    "OrganizationId": "c1c2c3c4-0000-0000-0000-000000000003",
}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


@pytest.fixture
def router() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_called=True) as mock:
        yield mock


async def probe(http: httpx.AsyncClient, api_url: str = API_URL) -> WhoAmI | ConnectionProblem:
    return await who_am_i(http, POLICY, api_url=api_url, access_token=TOKEN, timeout=5.0)


@pytest.mark.parametrize("api_url", [API_URL, f"{API_URL}/"])
async def test_success(api_url: str, http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    """A 200 with the three ids becomes WhoAmI, sent with the bearer token and OData headers."""
    route = router.get(WHOAMI).respond(200, json={"@odata.context": "x", **IDS})
    result = await probe(http, api_url)
    assert isinstance(result, WhoAmI)
    assert (result.user_id, result.organization_id, result.business_unit_id) == (
        IDS["UserId"],
        IDS["OrganizationId"],
        IDS["BusinessUnitId"],
    )
    assert result.latency_ms >= 0
    headers = route.calls.last.request.headers
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/json"
    assert headers["OData-MaxVersion"] == "4.0"
    assert headers["OData-Version"] == "4.0"


@pytest.mark.parametrize(
    ("status", "reason", "hint"),
    [
        (401, "unauthorized", "check api_url"),
        (403, "forbidden", "security role"),
        (404, "not_found", "/api/data/v9.2"),
        (500, "server_error", "try again later"),
        (503, "server_error", "try again later"),
        (429, "server_error", "throttling"),
        (400, "bad_response", "HTTP 400"),
    ],
)
async def test_error_statuses(
    status: int, reason: str, hint: str, http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    """Each error status maps to its reason with a message that says what to do."""
    router.get(WHOAMI).respond(status, json={"error": {"code": "0x80040220", "message": "no"}})
    result = await probe(http)
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == (reason, status)
    assert hint in result.message
    assert TOKEN not in result.message


@pytest.mark.parametrize(
    "response",
    [
        httpx.Response(200, text="<html>Sign in</html>"),
        httpx.Response(200, json=[IDS]),
        httpx.Response(200, json={**IDS, "UserId": ""}),
        httpx.Response(200, json={**IDS, "OrganizationId": 7}),
        httpx.Response(200, json={"UserId": IDS["UserId"]}),
    ],
)
async def test_garbage_is_bad_response(
    response: httpx.Response, http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    """A 200 without the three ids as non-empty strings is bad_response."""
    router.get(WHOAMI).mock(return_value=response)
    result = await probe(http)
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == ("bad_response", 200)


async def test_redirect_is_not_followed(http: httpx.AsyncClient, router: respx.MockRouter) -> None:
    """A 302 is bad_response naming api_url, and its Location is never requested."""
    route = router.get(WHOAMI).respond(302, headers={"Location": "https://login.microsoftonline.com/x"})
    result = await probe(http)
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == ("bad_response", 302)
    assert "api_url" in result.message
    assert route.call_count == 1
    assert len(router.calls) == 1


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectTimeout("t"), httpx.ReadTimeout("t"), httpx.ConnectError("refused")],
)
async def test_network_failures_are_unreachable(
    error: Exception, http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    """Timeouts and connection errors are unreachable, with no status and the host named."""
    router.get(WHOAMI).mock(side_effect=error)
    result = await probe(http)
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == ("unreachable", None)
    assert "org.crm.dynamics.com" in result.message


@pytest.mark.parametrize(
    "api_url",
    ["https://evil.example.com/api/data/v9.2", "http://org.crm.dynamics.com/api/data/v9.2"],
)
async def test_disallowed_url_is_not_called(
    api_url: str, http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    """An API URL the policy refuses is forbidden_url and no request is made."""
    result = await probe(http, api_url)
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == ("forbidden_url", None)
    assert "api_url" in result.message
    assert not router.calls


class _Unchecked(OutboundPolicy):
    """Lets every URL through, as if the policy had missed one httpx cannot send."""

    def check(self, url: str) -> str:
        return url


@pytest.mark.parametrize("api_url", ["https://xn--.crm.dynamics.com/api/data/v9.2", "https://a\u200db.x/api"])
async def test_an_api_url_httpx_cannot_send_is_forbidden_url(
    api_url: str, http: httpx.AsyncClient, router: respx.MockRouter
) -> None:
    """Defence in depth: IDNAError/InvalidURL at send time is a ConnectionProblem, never raised."""
    result = await who_am_i(
        http, _Unchecked(allowed_hosts=[]), api_url=api_url, access_token=TOKEN, timeout=5.0
    )
    assert isinstance(result, ConnectionProblem)
    assert (result.reason, result.status) == ("forbidden_url", None)
    assert "api_url" in result.message
    assert TOKEN not in result.message
    assert not router.calls
