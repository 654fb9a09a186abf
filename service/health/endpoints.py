"""Liveness, readiness and metrics. No API key; readiness never depends on Azure AD.

Readiness answers from a result at most a second old (``readiness.py``), so probes, however
many and however unauthenticated, ping the database at most once a second per process.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError

from service.context import Context
from service.deps import Ctx
from service.health.readiness import Readiness, Verdict
from service.kit.jsonutil import dumps
from service.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the database answers and its schema is at the migration head",
    responses={503: {"description": "Not ready; `reason` says why"}},
)
async def readyz(ctx: Ctx) -> Response:
    # Azure AD is deliberately not consulted: an outage there must not take every replica out
    # of rotation while cached tokens can still be served.
    if ctx.draining:
        return _answer(503, "draining", "The process is shutting down.")
    if ctx.readiness is None:
        ctx.readiness = Readiness(lambda: _check(ctx))
    found = await ctx.readiness.verdict()
    return _answer(found.status, found.reason, found.detail)


async def _check(ctx: Context) -> Verdict:
    try:
        revision = await current_revision(ctx.engine)
    except (SQLAlchemyError, OSError):
        return Verdict(503, "database_unreachable", "The database cannot be reached.")
    head = head_revision()
    if revision != head:
        return Verdict(
            503, "schema_behind", f"Schema is at {revision}, expected {head}: run token-broker migrate."
        )
    return Verdict(200, "ready")


def _answer(status: int, reason: str, detail: str | None) -> Response:
    body: dict[str, str] = {"status": "ready" if status == 200 else "not_ready", "reason": reason}
    if detail:
        body["detail"] = detail
    return Response(dumps(body), status_code=status, media_type="application/json")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(ctx: Ctx) -> Response:
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)
