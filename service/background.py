"""Periodic work of a replica: syncing with the others, and keeping refresh tokens alive.

* sync (every ``BROKER_SYNC_INTERVAL_SECONDS``, at most 5 s): drop cached tokens of accounts
  changed or deleted elsewhere (their VERSION moved), learn the default account, reload the
  managed API keys (so a revocation reaches every replica within the interval), and write
  ``last_used_at`` of keys and a sampled ``tokens_fetched`` event with the count of requests
  each key made (at most once a minute per key, never a row per request); what is pending when
  the replica stops is written then (``flush_key_usage``).
* keepalive: Azure refresh tokens die after 90 days unused; every authorization-code account not
  refreshed within ``BROKER_KEEPALIVE_INTERVAL_SECONDS`` is refreshed. The token row lock makes
  this one replica at a time per account; the others see the fresh ``last_refreshed_at``.
* credential expiry (every ``BROKER_CREDENTIAL_SCAN_INTERVAL_SECONDS``): one notice event per
  account and stage (``accounts/expiry.py``), which the webhook delivers, and the
  ``broker_credentials_expiring`` gauge.
* federated recovery (every ``FEDERATED_RECOVERY_SECONDS``, only with a token file set): accounts
  refused because the token file was missing or expired are made ready once it works again.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import expiry, federated
from service.accounts import repository as accounts_repo
from service.accounts.federated import FederatedTokenFile
from service.accounts.status import Status
from service.errors import BrokerError
from service.keys import repository as keys_repo
from service.keys.service import load_principals
from service.keys.store import KeyStore
from service.kit import timeutil
from service.metrics import Metrics
from service.settings import Settings
from service.tokens.broker import TokenBroker

log = logging.getLogger("service.background")

# last_used_at and the sampled tokens_fetched events: at most once a minute per key.
KEY_USAGE_EVERY_SECONDS = 60.0
# A stopping replica gives the database this long to take the pending key usage; shutdown must
# finish within Kubernetes' grace period whether or not the database answers.
FLUSH_TIMEOUT_SECONDS = 3.0
# The kubelet rewrites a projected token well before it expires; a broken file is noticed by the
# next refresh, its repair within this many seconds.
FEDERATED_RECOVERY_SECONDS = 15.0


@dataclass
class Background:
    """The periodic work, over exactly the objects it uses."""

    settings: Settings
    sessions: async_sessionmaker[AsyncSession]
    keystore: KeyStore
    broker: TokenBroker
    metrics: Metrics
    clock: Callable[[], datetime] = field(default=timeutil.utcnow)  # naive UTC; tests pass a fake
    federated: FederatedTokenFile | None = None

    async def federated_recovery_once(self) -> list[str]:
        if self.federated is None or not self.federated.path:
            return []
        recovered = await federated.recover(self.sessions, self.federated, timeutil.to_epoch(self.clock()))
        for account_id in recovered:
            self.broker.account_changed(account_id, credentials=True)
        return recovered

    async def credential_expiry_once(self) -> int:
        """Send the expiry notices due now and set the gauge; returns how many were sent."""
        sent, counts = await expiry.scan(self.sessions, self.clock())
        for within, count in counts.items():
            self.metrics.credentials_expiring.labels(within).set(count)
        return sent

    async def sync_once(self) -> None:
        mark = self.keystore.mark()
        async with self.sessions() as session:
            versions = await accounts_repo.account_versions(session)
            principals = await load_principals(session)
            counts = await accounts_repo.status_counts(session)
        self.broker.apply_versions(versions)
        self.keystore.replace_managed(principals, since=mark)
        for status in Status:
            self.metrics.accounts_by_status.labels(status).set(counts.get(status, 0))
        await self.write_key_usage()

    async def write_key_usage(self, *, every: float | None = None) -> None:
        """``last_used_at`` and one sampled ``tokens_fetched`` event per key that was used, each
        key at most once per ``every`` (default ``KEY_USAGE_EVERY_SECONDS``; the keys used more
        recently wait)."""
        usage = self.keystore.take_usage(every=KEY_USAGE_EVERY_SECONDS if every is None else every)
        if not usage:
            return
        try:
            async with self.sessions() as session, session.begin():
                touched = {
                    u.key_id: timeutil.from_epoch(u.last_used)
                    for u in usage
                    if u.key_id is not None and not u.service_account
                }
                if touched:
                    await keys_repo.touch_keys(session, touched)
                bound = {
                    u.key_id: timeutil.from_epoch(u.last_used)
                    for u in usage
                    if u.service_account and u.key_id
                }
                if bound:
                    await keys_repo.touch_bindings(session, bound)
                for u in usage:
                    await accounts_repo.add_event(
                        session,
                        account_id=None,
                        kind="tokens_fetched",
                        actor=u.fingerprint,
                        detail={
                            ("service_account_id" if u.service_account else "key_id"): u.key_id,
                            "requests": u.count,
                            "last_used_at": timeutil.from_epoch(u.last_used).isoformat() + "Z",
                        },
                    )
        except BaseException:
            self.keystore.give_back(usage)
            raise

    async def flush_key_usage(self) -> None:
        """At shutdown: the usage still pending, however recent, so a stopping replica loses none."""
        try:
            await asyncio.wait_for(self.write_key_usage(every=0.0), FLUSH_TIMEOUT_SECONDS)
        except Exception as exc:  # noqa: BLE001 -- shutdown goes on; the loss is logged
            log.warning("key usage not saved at shutdown", extra={"error_type": type(exc).__name__})

    async def keepalive_once(self) -> int:
        older_than = timeutil.utcnow() - timedelta(seconds=self.settings.keepalive_interval_seconds)
        async with self.sessions() as session:
            stale = await accounts_repo.stale_authorization_code_accounts(session, older_than=older_than)
        done = 0
        for account_id in stale:
            try:
                await self.broker.keepalive(account_id, refreshed_before=older_than)
                done += 1
            except BrokerError as exc:
                log.warning("keepalive refresh failed", extra={"account_id": account_id, "code": exc.code})
        return done

    def start(self) -> list[asyncio.Task[None]]:
        sync = self.settings.sync_interval_seconds
        keep = min(3600.0, self.settings.keepalive_interval_seconds / 24)
        scan = self.settings.credential_scan_interval_seconds
        tasks = []
        if self.federated is not None and self.federated.path:
            every = FEDERATED_RECOVERY_SECONDS
            tasks.append(
                asyncio.create_task(_every(lambda: every, self.federated_recovery_once, "federated"))
            )
        return [
            *tasks,
            asyncio.create_task(
                _every(lambda: scan, self.credential_expiry_once, "credential expiry", first=0.0)
            ),
            asyncio.create_task(_every(lambda: sync, self.sync_once, "sync")),
            asyncio.create_task(
                _every(lambda: keep * (0.5 + random.random()), self.keepalive_once, "keepalive")  # noqa: S311
            ),
        ]


async def _every(
    seconds: Callable[[], float],
    work: Callable[[], Awaitable[object]],
    name: str,
    *,
    first: float | None = None,
) -> None:
    """Run ``work`` every ``seconds()``; the first time after ``first`` seconds when given (the
    expiry gauge should not wait a whole interval after start-up)."""
    wait = first
    while True:
        await asyncio.sleep(seconds() if wait is None else wait)
        wait = None
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a periodic job must survive a bad round
            log.warning("%s failed", name, extra={"error_type": type(exc).__name__})
