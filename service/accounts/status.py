"""An account's status: the one vocabulary of schemas, metrics, repositories and refresh outcomes.

``ready``: tokens are being issued. ``needs_authorization`` and ``invalid_credentials``: a person
must act (authorize again; fix the client id or secret), and Azure is not asked again until the
account changes. ``failing``: Azure is down, slow or throttling; the broker backs off and retries.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    READY = "ready"
    NEEDS_AUTHORIZATION = "needs_authorization"
    INVALID_CREDENTIALS = "invalid_credentials"
    FAILING = "failing"
