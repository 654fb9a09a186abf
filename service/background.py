"""Periodic work of a replica: syncing with the others, and keeping refresh tokens alive.

* sync (every ``BROKER_SYNC_INTERVAL_SECONDS``, at most 5 s): drop cached tokens of accounts
  changed or deleted elsewhere (their VERSION moved), learn the default account, reload the
  managed API keys (so a revocation reaches every replica within the interval), and write
  ``last_used_at`` of keys (at most once a minute per key).
* keepalive: Azure refresh tokens die after 90 days unused; every authorization-code account not
  refreshed within ``BROKER_KEEPALIVE_INTERVAL_SECONDS`` is refreshed. The token row lock makes
  this one replica at a time per account; the others see the fresh ``last_refreshed_at``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

from . import repository as repo
from .context import Context
from .errors import BrokerError
from .keys import load_principals

log = logging.getLogger("service.background")


async def sync_once(ctx: Context) -> None:
    async with ctx.sessions() as session:
        versions = await repo.account_versions(session)
        principals = await load_principals(session)
        counts = await repo.status_counts(session)
        used = ctx.keystore.take_usage()
        if used:
            await repo.touch_keys(session, {k: repo.from_epoch(t) for k, t in used.items()})
            await session.commit()
    ctx.broker.apply_versions(versions)
    ctx.keystore.replace_managed(principals)
    for status in ("ready", "needs_authorization", "invalid_credentials", "failing"):
        ctx.metrics.accounts_by_status.labels(status).set(counts.get(status, 0))


async def keepalive_once(ctx: Context) -> int:
    older_than = repo.utcnow() - timedelta(seconds=ctx.settings.keepalive_interval_seconds)
    async with ctx.sessions() as session:
        stale = await repo.stale_authorization_code_accounts(session, older_than=older_than)
    done = 0
    for account_id in stale:
        try:
            await ctx.broker.keepalive(account_id, refreshed_before=older_than)
            done += 1
        except BrokerError as exc:
            log.warning("keepalive refresh failed", extra={"account_id": account_id, "code": exc.code})
    return done


async def _every(seconds: Callable[[], float], work: Callable[[], Awaitable[object]], name: str) -> None:
    while True:
        await asyncio.sleep(seconds())
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a periodic job must survive a bad round
            log.warning("%s failed", name, extra={"error_type": type(exc).__name__})


def start(ctx: Context) -> list[asyncio.Task[None]]:
    sync = ctx.settings.sync_interval_seconds
    keep = min(3600.0, ctx.settings.keepalive_interval_seconds / 24)
    return [
        asyncio.create_task(_every(lambda: sync, lambda: sync_once(ctx), "sync")),
        asyncio.create_task(
            _every(lambda: keep * (0.5 + random.random()), lambda: keepalive_once(ctx), "keepalive")  # noqa: S311
        ),
    ]
