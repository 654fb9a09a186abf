"""The problem+json document (RFC 9457): one body for every error, wherever it is sent from.

The FastAPI handlers (``service/api/problems.py``), the ASGI layers below the framework and the
callback page all render a ``BrokerError`` through these two functions, so an error reads the same
whichever layer answered it.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import Response

from service.errors import BrokerError
from service.kit.jsonutil import dumps

PROBLEM = "application/problem+json"


def problem_body(status: int, code: str, title: str, detail: str | None, **extra: Any) -> bytes:
    doc: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "code": code}
    if detail:
        doc["detail"] = detail
    doc.update(extra)
    return dumps(doc)


def problem_response(error: BrokerError, instance: str | None = None) -> Response:
    extra = error.extra()
    if instance:
        extra["instance"] = instance
    body = problem_body(error.status, error.code, error.title, error.detail, **extra)
    return Response(body, status_code=error.status, media_type=PROBLEM, headers=error.headers)
