"""Where a proxied request goes: ``{api_url}/{path}?{query}``, and never anywhere else.

Invariant: the URL returned has the API URL's scheme, host and port, and a path that starts with
the API URL's path followed by ``/``. The caller's path is taken from the raw (still
percent-encoded) request target, so what upstream decodes is exactly what was checked here: a
path that could leave the API URL's path once decoded or normalised (``..`` or ``.`` segments,
also percent-encoded; encoded slashes or backslashes; backslashes; empty segments such as
``//host``; a scheme such as ``https:``) is refused, not repaired. The outbound policy then checks
the final URL, as it checks every URL the broker calls.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import httpx

from service.errors import InvalidProxyPath
from service.kit.outbound import OutboundPolicy, OutboundURLError

PREFIX = "/accounts/"
MARKER = "/api/"
# %2f and %5c decode to / and \; %00 and other controls have no business in a resource path.
_FORBIDDEN_ESCAPES = re.compile(r"%(2f|5c|0[0-9a-f]|1[0-9a-f]|7f)", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


def is_proxy_path(path: str) -> bool:
    """Whether a (decoded) request path is ``/accounts/{id}/api/...``."""
    if not path.startswith(PREFIX):
        return False
    account, sep, _ = path[len(PREFIX) :].partition("/")
    return bool(account) and sep == "/" and path[len(PREFIX) + len(account) :].startswith(MARKER)


def raw_remainder(raw_path: bytes) -> str:
    """The raw text after ``/accounts/{id}/api/`` of a request target (percent-encoding kept)."""
    text = raw_path.decode("latin-1")
    if not text.startswith(PREFIX):
        raise InvalidProxyPath("The request path is not a proxy path.")
    _, sep, rest = text[len(PREFIX) :].partition(MARKER)
    if not sep:
        raise InvalidProxyPath("The request path is not a proxy path.")
    return rest


def check_remainder(rest: str) -> str:
    """``rest`` unchanged when it stays below the API URL's path, else ``InvalidProxyPath``."""
    if "\\" in rest or _FORBIDDEN_ESCAPES.search(rest):
        raise InvalidProxyPath("The path must not contain backslashes, encoded slashes or control bytes.")
    if any(ord(ch) <= 0x20 or ord(ch) >= 0x7F for ch in rest):
        raise InvalidProxyPath("The path must be percent-encoded ASCII without spaces.")
    if _SCHEME.match(rest):
        raise InvalidProxyPath("The path must be relative to the account's API URL, not a URL.")
    if rest == "":
        return rest
    segments = rest.split("/")
    for index, segment in enumerate(segments):
        if unquote(segment) in (".", ".."):
            raise InvalidProxyPath("The path must not contain '.' or '..' segments.")
        if segment == "" and index < len(segments) - 1:
            raise InvalidProxyPath("The path must not contain empty segments ('//').")
    return rest


def target(api_url: str, rest: str, query: bytes, policy: OutboundPolicy) -> httpx.URL:
    """The upstream URL for ``rest`` (checked) and the raw query string."""
    rest = check_remainder(rest)
    base = httpx.URL(api_url)
    base_path = base.raw_path.split(b"?", 1)[0].rstrip(b"/")
    raw = base_path + b"/" + rest.encode("ascii")
    if query:
        raw += b"?" + query
    url = base.copy_with(raw_path=raw, fragment=None)
    path = url.raw_path.split(b"?", 1)[0]
    same_origin = (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)
    if not same_origin or not path.startswith(base_path + b"/"):
        raise InvalidProxyPath("The path leaves the account's API URL.")
    try:
        policy.check(str(url))
    except OutboundURLError as exc:
        raise InvalidProxyPath(f"The account's API URL may not be called: it {exc}.") from None
    return url
