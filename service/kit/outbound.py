"""Which URLs the broker may send secrets to.

The broker POSTs client secrets and refresh tokens to URLs an admin typed in, so every outbound
URL must be ``https`` (unless ``BROKER_ALLOW_HTTP``), carry no userinfo, and have a host matching
``BROKER_ALLOWED_HOSTS``. A pattern matches the host name only (the port is ignored);
``*.example.com`` matches its subdomains (not ``example.com`` itself); an IP address matches only
when listed exactly. The host must also be one httpx can send to (IDNA-valid), so a URL that
passes is never refused later at send time. The check runs when a URL is saved and again before
every call.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


class OutboundURLError(ValueError):
    """The URL may not be called; the message says why in plain words (never echoes secrets)."""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _sendable(url: str) -> bool:
    """Whether httpx can build a request for ``url``.

    Building it is what IDNA-encodes (and decodes) the host: a host urlsplit accepts, such as a
    bare ``xn--`` label or one with U+200D, would otherwise fail only at send time.
    """
    try:
        httpx.Request("GET", url)
    except (httpx.InvalidURL, ValueError):  # idna.IDNAError is a UnicodeError, so a ValueError
        return False
    return True


def host_matches(host: str, pattern: str) -> bool:
    host = host.lower().rstrip(".")
    pattern = pattern.lower().strip()
    if _is_ip(host) or pattern.startswith("["):
        return host == pattern.strip("[]")
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


@dataclass(frozen=True)
class OutboundPolicy:
    allowed_hosts: Sequence[str]
    allow_http: bool = False

    def check(self, url: str) -> str:
        """Return the URL unchanged when it may be called, else raise ``OutboundURLError``."""
        if any(ch.isspace() or ord(ch) < 0x20 for ch in url):
            raise OutboundURLError("must not contain spaces or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise OutboundURLError("is not a valid URL") from exc
        schemes = ("https", "http") if self.allow_http else ("https",)
        if parts.scheme.lower() not in schemes:
            raise OutboundURLError("must use https")
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise OutboundURLError("must not contain a user name or password")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise OutboundURLError("has no host")
        if port == 0:
            raise OutboundURLError("has an invalid port")
        if not any(host_matches(host, p) for p in self.allowed_hosts):
            kind = "IP address" if _is_ip(host) else "host"
            raise OutboundURLError(
                f"{kind} '{host}' is not in BROKER_ALLOWED_HOSTS; ask the operator to allow it"
            )
        if not _sendable(url):
            raise OutboundURLError("has a host name that is not valid")
        if parts.fragment:
            raise OutboundURLError("must not contain a fragment")
        return url
