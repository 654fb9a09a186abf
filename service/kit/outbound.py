"""Which URLs the broker may send secrets to.

The broker POSTs client secrets and refresh tokens to URLs an admin typed in, so every outbound
URL must be ``https`` (unless ``BROKER_ALLOW_HTTP``), carry no userinfo, and have a host matching
``BROKER_ALLOWED_HOSTS``. ``*.example.com`` matches its subdomains (not ``example.com``
itself); an IP address matches only when listed exactly. A pattern without a port matches only
the scheme's default port (443; 80 for ``http``), ``host:8443`` that port, ``host:*`` any port.
Only RFC 1123 host names are matched: the host is taken in the form httpx connects to (IDNA
A-labels, lower case), must consist of letters, digits and inner hyphens in dot-separated labels
of at most 63 characters, and must be the same host urlsplit sees, so a backslash, ``%``, ``_`` and
other characters a parser might read differently never reach the match. The check runs when a
URL is saved and again before every call.
"""

from __future__ import annotations

import ipaddress
import re
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


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_RFC1123 = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DEFAULT_PORTS = {"https": 443, "http": 80}


def _wire_host(url: str) -> str | None:
    """The host as httpx will connect to it (A-labels), or None when httpx cannot send to ``url``.

    Building the request is what IDNA-encodes (and decodes) the host: a host urlsplit accepts, such
    as a bare ``xn--`` label or one with U+200D, would otherwise fail only at send time.
    """
    try:
        raw = httpx.Request("GET", url).url.raw_host
    except (httpx.InvalidURL, ValueError):  # idna.IDNAError is a UnicodeError, so a ValueError
        return None
    try:
        return raw.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None


def is_host_name(host: str) -> bool:
    """RFC 1123: dot-separated labels of letters, digits and inner hyphens, 253 characters at most."""
    return len(host) <= 253 and _RFC1123.fullmatch(host) is not None


def split_pattern(pattern: str) -> tuple[str, str | None]:
    """``host[:port]`` into the host and the port text (None, a number, or ``*``)."""
    pattern = pattern.lower().strip()
    if pattern.startswith("["):  # [v6]:port
        host, _, rest = pattern[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if pattern.count(":") == 1:
        host, _, port = pattern.partition(":")
        return host, port
    return pattern, None


def host_matches(host: str, pattern: str) -> bool:
    host = host.lower().rstrip(".")
    pattern, _ = split_pattern(pattern)
    if _is_ip(host) or _is_ip(pattern):
        return host == pattern
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


def port_matches(port: int, default: int, pattern: str) -> bool:
    _, allowed = split_pattern(pattern)
    if allowed is None:
        return port == default
    return allowed == "*" or allowed == str(port)


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
        wire = _wire_host(url)
        if wire is None:
            raise OutboundURLError("has a host name that is not valid")
        if not _is_ip(host):
            # urlsplit and httpx must agree on the host, and it must be a host name, before it is
            # compared with the allow-list: 'evil.com%5c.crm.dynamics.com' ends like an allowed one.
            ascii_host = host.lower() if host.isascii() else wire
            if not is_host_name(wire) or ascii_host != wire:
                raise OutboundURLError("has a host name that is not valid (RFC 1123)")
            host = wire
        matching = [p for p in self.allowed_hosts if host_matches(host, p)]
        if not matching:
            kind = "IP address" if _is_ip(host) else "host"
            raise OutboundURLError(
                f"{kind} '{host}' is not in BROKER_ALLOWED_HOSTS; ask the operator to allow it"
            )
        default = _DEFAULT_PORTS[parts.scheme.lower()]
        effective = default if port is None else port
        if not any(port_matches(effective, default, p) for p in matching):
            raise OutboundURLError(
                f"port {effective} is not allowed for '{host}': only {default}, unless "
                f"BROKER_ALLOWED_HOSTS names '{host}:{effective}'"
            )
        if parts.fragment:
            raise OutboundURLError("must not contain a fragment")
        return url
