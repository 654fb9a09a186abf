"""``OutboundPolicy.check`` refuses what httpx cannot send, and ``transport.send`` says so plainly.

Hosts urlsplit accepts but httpx's IDNA step refuses (a bare ``xn--`` label, U+200D) used to pass
the check and fail at send time with ``idna.IDNAError``/``httpx.InvalidURL``, outside the errors
the callers translate.
"""

from __future__ import annotations

import httpx
import pytest
import respx

from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.kit.transport import UnsendableURL, send
from service.settings import DEFAULT_ALLOWED_HOSTS, split_list

POLICY = OutboundPolicy(split_list(DEFAULT_ALLOWED_HOSTS))
UNSENDABLE = [
    "https://xn--.crm.dynamics.com/oauth2/token",
    "https://xn--abc.crm.dynamics.com/api/data/v9.2",
    "https://a\u200db.crm.dynamics.com/api/data/v9.2",
    "https://\uff41.crm.dynamics.com/api/data/v9.2",
]


@pytest.mark.parametrize("url", UNSENDABLE)
def test_a_host_httpx_cannot_send_to_is_refused(url: str) -> None:
    with pytest.raises(OutboundURLError, match="has a host name that is not valid"):
        POLICY.check(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://login.microsoftonline.com/tenant/oauth2/token",
        "https://org.crm.dynamics.com/api/data/v9.2/WhoAmI",
        "https://ORG.crm.dynamics.com./api/data/v9.2",
        "https://login.microsoftonline.com:8443/tenant/oauth2/token",
        "https://xn--9ca.crm.dynamics.com/api/data/v9.2",  # a valid A-label
        "https://\u00e9.crm.dynamics.com/api/data/v9.2",  # its U-label
    ],
)
def test_hosts_httpx_can_send_to_still_pass(url: str) -> None:
    assert POLICY.check(url) == url


@pytest.mark.parametrize("url", UNSENDABLE)
async def test_send_raises_unsendable_url_and_sends_nothing(url: str) -> None:
    with respx.mock(assert_all_mocked=True) as router:
        async with httpx.AsyncClient() as http:
            with pytest.raises(UnsendableURL) as info:
                await send(http, "POST", url, limit=5.0, headers={}, data={"client_secret": "s3cret"})
    assert not router.calls
    assert "s3cret" not in str(info.value)
