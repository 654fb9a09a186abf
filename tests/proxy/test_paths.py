"""Path escapes: what may follow /accounts/{id}/api/, and the URL it becomes."""

from __future__ import annotations

import pytest

from service.errors import InvalidProxyPath
from service.kit.outbound import OutboundPolicy
from service.proxy import paths

API = "https://contoso.crm.dynamics.com/api/data/v9.2"
POLICY = OutboundPolicy(["*.crm.dynamics.com"])
KEYED = "accounts(00000000-0000-0000-0000-000000000001)"
NESTED = "EntityDefinitions(LogicalName='account')/Attributes"

ESCAPES = [
    "..",
    "../../x",
    "a/../../b",
    "%2e%2e/x",
    "%2E%2E/x",
    ".%2e/x",
    "a/%2e%2e",
    "./a",
    "a%2fb",
    "a%2Fb",
    "..%2fx",
    "a%5cb",
    "a\\b",
    "..\\x",
    "/evil.example/x",
    "//evil.example/x",
    "a//b",
    "https://evil.example/x",
    "http:x",
    "javascript:alert(1)",
    "a%00b",
    "a%0d%0aHost: evil",
    "a b",
    "caf\u00e9",
]


@pytest.mark.parametrize("rest", ESCAPES)
def test_a_path_that_could_leave_the_api_url_is_refused(rest: str) -> None:
    """Dot segments (also encoded), encoded slashes, backslashes, empty segments and URLs are 400."""
    with pytest.raises(InvalidProxyPath):
        paths.target(API, rest, b"", POLICY)


@pytest.mark.parametrize(
    ("rest", "query", "expected"),
    [
        ("WhoAmI", b"", f"{API}/WhoAmI"),
        ("accounts", b"$select=name&$top=3", f"{API}/accounts?$select=name&$top=3"),
        (KEYED, b"", f"{API}/{KEYED}"),
        (NESTED, b"", f"{API}/{NESTED}"),
        ("contacts", b"$filter=fullname%20eq%20'a%2Fb'", f"{API}/contacts?$filter=fullname%20eq%20'a%2Fb'"),
        ("a%20b", b"", f"{API}/a%20b"),
        ("", b"", f"{API}/"),
        ("accounts/", b"", f"{API}/accounts/"),
        ("a..b/.c", b"", f"{API}/a..b/.c"),
    ],
)  # fmt: skip
def test_a_path_below_the_api_url_is_forwarded_as_it_is(rest: str, query: bytes, expected: str) -> None:
    """OData paths, keys and query strings reach upstream byte for byte (encoded slashes in a query too)."""
    url = paths.target(API, rest, query, POLICY)
    assert str(url) == expected
    assert url.host == "contoso.crm.dynamics.com"


def test_the_api_url_itself_must_pass_the_outbound_policy() -> None:
    """An API URL outside BROKER_ALLOWED_HOSTS is never called, whatever the path."""
    with pytest.raises(InvalidProxyPath):
        paths.target("https://evil.example/api", "WhoAmI", b"", POLICY)
    with pytest.raises(InvalidProxyPath):
        paths.target("http://contoso.crm.dynamics.com/api", "WhoAmI", b"", POLICY)


def test_an_api_url_with_a_trailing_slash_gets_no_double_slash() -> None:
    """`api_url` ending in / joins with exactly one slash."""
    assert str(paths.target(API + "/", "WhoAmI", b"", POLICY)) == f"{API}/WhoAmI"


@pytest.mark.parametrize(
    ("path", "proxied"),
    [
        ("/accounts/a/api/x", True),
        ("/accounts/a/api/", True),
        ("/accounts/default/api/x/token", True),
        ("/accounts/a/token", False),
        ("/accounts/a/api", False),
        ("/accounts//api/x", False),
        ("/accounts/a/b/api/x", False),
        ("/keys/api/x", False),
    ],
)
def test_which_request_paths_are_proxy_paths(path: str, proxied: bool) -> None:
    """Only /accounts/{id}/api/... is the proxy (a client key may call it; it has its own body limit)."""
    assert paths.is_proxy_path(path) is proxied


def test_the_raw_remainder_keeps_percent_encoding() -> None:
    """The check sees the bytes as sent, not as decoded by the server."""
    assert paths.raw_remainder(b"/accounts/a%20b/api/x%2Fy") == "x%2Fy"
    with pytest.raises(InvalidProxyPath):
        paths.check_remainder(paths.raw_remainder(b"/accounts/a/api/x%2Fy"))
