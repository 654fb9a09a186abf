"""Sending one webhook: the URL rule, the signature and the POST.

Invariants: the URL is checked once, at start-up, and never logged (some webhook URLs carry a
secret in their path); the body is signed with HMAC-SHA256 over ``<timestamp>.<body>``;
redirects are never followed; each POST is bounded by a timeout and its response body is
never read. Retrying, ordering and the lease are the outbox's (``service.py``).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import httpx

from service.errors import ConfigurationError
from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.settings import Settings


def check_url(settings: Settings) -> str | None:
    """``BROKER_WEBHOOK_URL`` when set and acceptable, None when unset; ``ConfigurationError`` else."""
    url = settings.webhook_url
    if not url:
        return None
    # Not checked against BROKER_ALLOWED_HOSTS on purpose: that list names where the broker may send
    # client secrets and refresh tokens (Microsoft's hosts). A webhook carries neither, is set by the
    # operator (not by an API caller) and usually points at an internal host that does not belong on
    # that list. Every other outbound rule holds: https unless BROKER_ALLOW_HTTP, no user name or
    # password, no fragment, and (in ``Delivery.post``) no redirects followed. Checked once, at start-up:
    # the URL comes from the environment and cannot change while the process runs.
    try:
        host = (urlsplit(url).hostname or "").rstrip(".")
        # Any port: the operator chose it (BROKER_ALLOWED_HOSTS' 443-only rule is for Microsoft).
        pattern = f"[{host}]:*" if ":" in host else f"{host}:*"
        return OutboundPolicy([pattern] if host else [], settings.allow_http).check(url)
    except (OutboundURLError, ValueError) as exc:
        # The URL itself is not echoed: its path may be a secret.
        raise ConfigurationError(f"BROKER_WEBHOOK_URL {exc}; fix it or unset it.") from None


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Broker-Signature`` value: HMAC-SHA256 over ``<timestamp>.<body>``, hex."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class Delivery:
    """POSTs signed bodies to one URL."""

    def __init__(
        self,
        url: str,
        *,
        secret: bytes,
        http: httpx.AsyncClient,
        timeout: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.host = urlsplit(url).hostname
        self._secret = secret
        self._http = http
        self._timeout = httpx.Timeout(timeout)
        self._wall = wall

    async def post(self, event_id: int, body: bytes) -> tuple[int | None, str | None]:
        """(HTTP status, None) or (None, exception type). The response body is never read."""
        timestamp = str(int(self._wall()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "dynamics-token-broker",
            "X-Broker-Event-Id": str(event_id),
            "X-Broker-Timestamp": timestamp,
            "X-Broker-Signature": sign(self._secret, timestamp, body),
        }
        try:
            async with self._http.stream(
                "POST",
                self.url,
                content=body,
                headers=headers,
                timeout=self._timeout,
                follow_redirects=False,
            ) as response:
                return response.status_code, None
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
