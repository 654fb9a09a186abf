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
        "https://login.microsoftonline.com:443/tenant/oauth2/token",
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


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.com\\.crm.dynamics.com/t",
        "https://evil.com%2f.crm.dynamics.com/t",
        "https://evil.com%5c.crm.dynamics.com/t",
        "https://evil.com%2F.crm.dynamics.com/t",
        "https://evil_com.crm.dynamics.com/t",
        "https://-evil.crm.dynamics.com/t",
        "https://evil-.crm.dynamics.com/t",
        "https://evil..crm.dynamics.com/t",
        "https://evil.com'.crm.dynamics.com/t",
        "https://" + "a" * 64 + ".crm.dynamics.com/t",
    ],
)
def test_only_rfc_1123_host_names_are_matched(url: str) -> None:
    """A host that is not an RFC 1123 name is refused, however it ends."""
    with pytest.raises(OutboundURLError, match="not valid"):
        POLICY.check(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://login.microsoftonline.com:22/",
        "https://login.microsoftonline.com:8443/tenant/oauth2/token",
        "https://org.crm.dynamics.com:80/api/data/v9.2",
    ],
)
def test_only_port_443_without_a_port_in_the_allow_list(url: str) -> None:
    """A pattern without a port allows the default port only."""
    with pytest.raises(OutboundURLError, match=r"port \d+ is not allowed"):
        POLICY.check(url)


def test_an_allow_list_entry_may_name_a_port() -> None:
    """``host:port`` allows that port, ``host:*`` any; an IP port is held to the same rule."""
    policy = OutboundPolicy(["login.example.com:8443", "10.0.0.5:*", "*.example.net:9443"])
    assert policy.check("https://login.example.com:8443/t")
    assert policy.check("https://10.0.0.5:1234/t")
    assert policy.check("https://a.example.net:9443/t")
    for url in ("https://login.example.com/t", "https://login.example.com:22/t", "https://a.example.net/t"):
        with pytest.raises(OutboundURLError, match="is not allowed"):
            policy.check(url)
    with pytest.raises(OutboundURLError, match="port 22 is not allowed"):
        OutboundPolicy(["10.0.0.5"]).check("https://10.0.0.5:22/t")
