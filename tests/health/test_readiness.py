"""Readiness answers from a recent result: probes cannot be turned into database load."""

from __future__ import annotations

import asyncio
from typing import Any

from service.health.readiness import Readiness, Verdict
from tests.conftest import sql_statements


async def test_repeated_and_concurrent_probes_share_one_ping(running: Any) -> None:
    """Within a second, a second probe and fifty concurrent ones run no SQL beyond the first check."""
    first = await running.client.get("/readyz")
    assert first.status_code == 200
    with sql_statements(running) as statements:
        again = await asyncio.gather(*(running.client.get("/readyz") for _ in range(50)))
    assert {r.status_code for r in again} == {200}
    assert statements == []


async def test_concurrent_checks_are_one_flight_and_expire() -> None:
    """100 concurrent callers wait on one check; after max_age the next caller runs a new one."""
    now = [100.0]
    release = asyncio.Event()
    calls = 0

    async def check() -> Verdict:
        nonlocal calls
        calls += 1
        await release.wait()
        return Verdict(200, "ready")

    readiness = Readiness(check, max_age=1.0, clock=lambda: now[0])
    waiters = [asyncio.ensure_future(readiness.verdict()) for _ in range(100)]
    await asyncio.sleep(0)
    release.set()
    assert {v.reason for v in await asyncio.gather(*waiters)} == {"ready"}
    assert calls == 1
    now[0] += 0.5
    await readiness.verdict()
    assert calls == 1
    now[0] += 0.6
    await readiness.verdict()
    assert calls == 2


async def test_a_cancelled_probe_does_not_cancel_the_check() -> None:
    """A probe that disconnects mid-check leaves the check running for the others."""
    release = asyncio.Event()

    async def check() -> Verdict:
        await release.wait()
        return Verdict(503, "database_unreachable", "down")

    readiness = Readiness(check, clock=lambda: 0.0)
    first = asyncio.ensure_future(readiness.verdict())
    second = asyncio.ensure_future(readiness.verdict())
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert (await second).reason == "database_unreachable"
