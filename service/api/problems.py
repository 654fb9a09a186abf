"""Every error becomes RFC 9457 problem details here, and nowhere else.

Validation errors keep their location and message but never the submitted value (it may be a
secret). Unexpected exceptions are logged with their type only and answered with a plain 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import BrokerError, StorageUnavailable
from service.kit.problems import PROBLEM, problem_body, problem_response

log = logging.getLogger("service.api")

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    400: "bad_request",
}


def _clean_validation(errors: list[Any]) -> list[dict[str, Any]]:
    cleaned = []
    for err in errors:
        loc = [str(part) for part in err.get("loc", ())]
        cleaned.append(
            {"loc": loc, "msg": str(err.get("msg", "invalid")), "type": str(err.get("type", "invalid"))}
        )
    return cleaned


def install(app: FastAPI) -> None:
    async def broker_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, BrokerError)
        return problem_response(exc, request.url.path)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = _clean_validation(list(exc.errors()))
        where = ", ".join(".".join(e["loc"][1:] or e["loc"]) + ": " + e["msg"] for e in errors[:5])
        body = problem_body(
            422,
            "validation_error",
            "Invalid request",
            where or "The request is invalid.",
            errors=errors,
            instance=request.url.path,
        )
        return Response(body, status_code=422, media_type=PROBLEM)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        body = problem_body(exc.status_code, code, str(exc.detail), None, instance=request.url.path)
        return Response(body, status_code=exc.status_code, media_type=PROBLEM, headers=exc.headers)

    async def storage_error(request: Request, exc: Exception) -> Response:
        log.error("database error", extra={"error_type": type(exc).__name__})
        return problem_response(
            StorageUnavailable("The database cannot be reached; try again."), request.url.path
        )

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("unexpected error", extra={"error_type": type(exc).__name__, "path": request.url.path})
        body = problem_body(
            500, "internal_error", "Internal error", "Something went wrong; it has been logged."
        )
        return Response(body, status_code=500, media_type=PROBLEM)

    app.add_exception_handler(BrokerError, broker_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(SQLAlchemyError, storage_error)
    app.add_exception_handler(Exception, unexpected)


def install_openapi(app: FastAPI) -> None:
    """Document every error as what it is: ``application/problem+json`` with the Problem schema.

    FastAPI files error models under ``application/json`` and its own validation error model;
    the service answers RFC 9457 documents, so the generated document is corrected once here.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = generate()
        problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
        for item in spec.get("paths", {}).values():
            for operation in item.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status.isdigit() and int(status) >= 400 and "application/json" in content:
                        del content["application/json"]
                        content[PROBLEM] = problem
        schemas = spec.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
