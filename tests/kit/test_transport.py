"""``transport.send``: a request dropped under a kept-alive connection goes out once more, fast
failures only; the Azure AD grants through it are tested in test_azure_ad.py."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import respx

from service.kit.transport import send

URL = "https://org.crm.dynamics.com/api/data/v9.2/WhoAmI"


@pytest.mark.parametrize("dropped", [httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError])
async def test_fast_drop_is_sent_once_more(dropped: type[httpx.TransportError]) -> None:
    with respx.mock(assert_all_called=True) as router:
        route = router.get(URL).mock(side_effect=[dropped("Server disconnected"), httpx.Response(200)])
        async with httpx.AsyncClient() as http:
            response = await send(http, "GET", URL, limit=5.0, headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert route.call_count == 2
    assert route.calls[1].request.headers["accept"] == "application/json"


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ProxyError("proxy")]
)
async def test_other_failures_are_not_sent_again(error: httpx.HTTPError) -> None:
    with respx.mock(assert_all_called=True) as router:
        route = router.get(URL).mock(side_effect=error)
        async with httpx.AsyncClient() as http:
            with pytest.raises(type(error)):
                await send(http, "GET", URL, limit=5.0, headers={})
    assert route.call_count == 1


async def test_slow_drop_is_not_sent_again() -> None:
    """A connection that fails after more than half the limit is a failing server, not an idle
    connection's race: sending again could double the caller's wait."""

    async def slow_drop(_request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.3)
        raise httpx.ReadError("Connection reset by peer")

    with respx.mock(assert_all_called=True) as router:
        route = router.post(URL).mock(side_effect=slow_drop)
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.ReadError):
                await send(http, "POST", URL, limit=0.5, headers={}, data={"a": "b"})
    assert route.call_count == 1
