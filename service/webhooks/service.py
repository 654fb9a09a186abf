"""Webhook notifications of account status changes, delivered by one replica at a time.

The outbox is the ``broker_events`` table: the broker and the account service write a
``status_changed`` event in the same transaction as the change, so a notification goes out only
for a change that committed, and none is lost when a replica dies. Invariants:

* One replica delivers: the holder of the lease ``webhooks`` (``broker_leases``), renewed every
  round and with every step of the cursor. A replica that stops releases it; one that dies loses
  it after the lease's lifetime, and another takes over.
* Events go out in id order, one at a time. The cursor (the row ``webhooks:cursor`` of the same
  table, ``holder`` = the last event id handled) moves only after an event was delivered or given
  up, and only while the lease is held. Delivery is at least once: a holder that dies between the
  POST and the cursor write makes the next one send it again; receivers deduplicate on
  ``X-Broker-Event-Id``. The first start with a webhook begins at the newest event (no backlog).
* MySQL hands out ids at insert, not at commit: a gap in ids may be a transaction still
  committing, so the loop waits up to ``webhook_gap_grace_seconds`` for it before moving past
  (a rolled-back insert leaves a gap that never fills). SQLite has one writer: no such wait.
* A failed delivery (no 2xx, a redirect, a timeout) is retried with exponential backoff and
  jitter, at most ``webhook_max_attempts`` times, then given up (logged, counted ``gave_up``);
  later events wait behind it, so receivers see changes in order.
* The body is built from a fixed set of fields (ids, name, statuses, an error code and Azure's
  sanitised message): never a secret or token. It is signed with HMAC-SHA256 over
  ``<timestamp>.<body>``. The URL is never logged (some webhook URLs carry a secret in their
  path), redirects are never followed, and each POST is bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.errors import ConfigurationError
from service.kit.backoff import exp_jitter
from service.kit.jsonutil import dumps
from service.kit.outbound import OutboundPolicy, OutboundURLError
from service.metrics import Metrics
from service.models import Event
from service.settings import Settings
from service.webhooks import repository as repo

log = logging.getLogger("service.webhooks")

EVENT = "account.status_changed"
KIND = "status_changed"
LEASE = "webhooks"
CURSOR = "webhooks:cursor"
BATCH = 100
# The cursor shares the lease table but is not a lease: it never expires.
NEVER = datetime(9999, 12, 31)
# A refresh_failed event written with the status change (same transaction) gives the message.
MESSAGE_WINDOW = timedelta(seconds=5)
MAX_MESSAGE = 1024


def check_url(settings: Settings) -> str | None:
    """``BROKER_WEBHOOK_URL`` when set and acceptable, None when unset; ``ConfigurationError`` else."""
    url = settings.webhook_url
    if not url:
        return None
    # Not checked against BROKER_ALLOWED_HOSTS on purpose: that list names where the broker may send
    # client secrets and refresh tokens (Microsoft's hosts). A webhook carries neither, is set by the
    # operator (not by an API caller) and usually points at an internal host that does not belong on
    # that list. Every other outbound rule holds: https unless BROKER_ALLOW_HTTP, no user name or
    # password, no fragment, and (in ``_post``) no redirects followed. Checked once, at start-up:
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


def lease_ttl(settings: Settings) -> timedelta:
    """Outlives a round with one slow POST several times over, so a live holder keeps the lease."""
    return timedelta(
        seconds=max(15.0, 3 * (settings.webhook_timeout_seconds + settings.webhook_poll_seconds))
    )


def replica_id() -> str:
    """Who holds the lease: the host name (the pod's name on Kubernetes) and a random suffix."""
    return f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:12]}"


def _detail(event: Event) -> dict[str, Any]:
    try:
        detail = json.loads(event.detail) if event.detail else {}
    except ValueError:
        return {}
    return detail if isinstance(detail, dict) else {}


@dataclass
class _Head:
    """The event at the front of the queue, and how its delivery has gone so far."""

    event_id: int
    body: bytes
    account_id: str | None
    to_status: str | None
    attempts: int = 0
    next_try: float = 0.0


class Notifier:
    """The delivery loop of one replica; only the lease holder sends anything."""

    def __init__(
        self,
        *,
        url: str,
        sessions: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        assert settings.webhook_secret is not None  # the settings validator insists on it
        self._url = url
        self._host = urlsplit(url).hostname
        self._secret = settings.webhook_secret.get_secret_value().encode()
        self._sessions = sessions
        self._http = http
        self._settings = settings
        self._metrics = metrics
        self._clock, self._wall, self._rng = clock, wall, rng
        self._timeout = httpx.Timeout(settings.webhook_timeout_seconds)
        self._ttl = lease_ttl(settings)
        self._grace = 0.0 if settings.is_sqlite else settings.webhook_gap_grace_seconds
        self.holder = replica_id()
        self._head: _Head | None = None
        self._gaps: dict[int, float] = {}  # id after a gap -> when the gap was first seen
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def prime(self) -> None:
        """Create the cursor at the newest event if there is none: notify from now on."""
        async with self._sessions() as session:
            cursor = await repo.get_lease(session, CURSOR)
            if cursor is not None and cursor.holder.isdigit():
                return
            newest = str(await repo.newest_event_id(session))
            if cursor is None:
                await repo.add_lease(session, CURSOR, newest, expires_at=NEVER)
            else:  # not a number: someone edited the row; start again from now
                cursor.holder = newest
            try:
                await session.commit()
            except SQLAlchemyError:  # another replica created it first
                await session.rollback()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Stop the loop and hand the lease on at once (bounded: shutdown must not hang here)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(SQLAlchemyError, TimeoutError):
            await asyncio.wait_for(self._release(), timeout=2.0)

    async def _run(self) -> None:
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must survive a bad round (database down)
                log.warning("webhook round failed", extra={"error_type": type(exc).__name__})
            await asyncio.sleep(self._settings.webhook_poll_seconds * (0.75 + self._rng() / 2))

    # -- one round ----------------------------------------------------------------------------------

    async def run_once(self) -> int:
        """Deliver (or give up on) what is due, in order; returns how many events were handled."""
        if not await self._take_lease():
            self._head = None  # another replica delivers; its attempts are its own
            return 0
        cursor = await self._cursor()
        if cursor is None:
            await self.prime()
            return 0
        async with self._sessions() as session:
            events = await repo.events_after(session, cursor, limit=BATCH)
        handled, position, saved = 0, cursor, cursor
        for event in events:
            if not self._gap_passed(position, event.id):
                break
            if event.kind == KIND:
                if not await self._deliver(event):
                    break
                handled += 1
                if not await self._advance(event.id):
                    return handled
                saved = event.id
            position = event.id
        if position != saved:
            await self._advance(position)
        self._gaps = {k: v for k, v in self._gaps.items() if k > position}
        return handled

    def _gap_passed(self, position: int, next_id: int) -> bool:
        if next_id == position + 1 or self._grace <= 0:
            return True
        first_seen = self._gaps.setdefault(next_id, self._clock())
        return self._clock() - first_seen >= self._grace

    async def _deliver(self, event: Event) -> bool:
        """True when the event is done with (delivered or given up); False: try again later."""
        if self._head is None or self._head.event_id != event.id:
            self._head = await self._build(event)
        head = self._head
        if self._clock() < head.next_try:
            return False
        head.attempts += 1
        status, error = await self._post(head)
        where = {"account_id": head.account_id, "to_status": head.to_status, "attempt": head.attempts}
        if status is not None and 200 <= status < 300:
            self._metrics.webhook_deliveries.labels("delivered").inc()
            log.info("webhook event %d delivered", head.event_id, extra={**where, "status": status})
            self._head = None
            return True
        why = {"status": status, "error_type": error, "host": self._host}
        if head.attempts >= self._settings.webhook_max_attempts:
            self._metrics.webhook_deliveries.labels("gave_up").inc()
            log.error(
                "webhook event %d not delivered after %d attempts; giving up on it",
                head.event_id,
                head.attempts,
                extra={**where, **why},
            )
            self._head = None
            return True
        self._metrics.webhook_deliveries.labels("failed").inc()
        head.next_try = self._clock() + self._backoff(head.attempts)
        log.warning("webhook event %d not delivered; will retry", head.event_id, extra={**where, **why})
        return False

    def _backoff(self, attempts: int) -> float:
        return exp_jitter(
            attempts,
            base=self._settings.webhook_backoff_base_seconds,
            cap=self._settings.webhook_backoff_max_seconds,
            rng=self._rng,
        )

    async def _post(self, head: _Head) -> tuple[int | None, str | None]:
        """(HTTP status, None) or (None, exception type). The response body is never read."""
        timestamp = str(int(self._wall()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "dynamics-token-broker",
            "X-Broker-Event-Id": str(head.event_id),
            "X-Broker-Timestamp": timestamp,
            "X-Broker-Signature": sign(self._secret, timestamp, head.body),
        }
        try:
            async with self._http.stream(
                "POST",
                self._url,
                content=head.body,
                headers=headers,
                timeout=self._timeout,
                follow_redirects=False,
            ) as response:
                return response.status_code, None
        except httpx.HTTPError as exc:
            return None, type(exc).__name__

    async def _build(self, event: Event) -> _Head:
        detail = _detail(event)
        to_status = detail.get("to")
        doc: dict[str, Any] = {"event": EVENT, "id": event.id, "account_id": event.account_id}
        async with self._sessions() as session:
            name = await self._account_name(session, event.account_id)
            message = await self._message(session, event, detail.get("code"))
        if name is not None:
            doc["account_name"] = name
        doc |= {"from": detail.get("from"), "to": to_status, "code": detail.get("code")}
        if message:
            doc["message"] = message[:MAX_MESSAGE]
        doc["at"] = event.created_at.isoformat(timespec="milliseconds") + "Z"  # stored as naive UTC
        return _Head(
            event.id, dumps(doc), event.account_id, to_status if isinstance(to_status, str) else None
        )

    # -- the database -------------------------------------------------------------------------------

    async def _take_lease(self) -> bool:
        try:
            async with self._sessions() as session, session.begin():
                return await repo.try_lease(session, LEASE, self.holder, ttl=self._ttl)
        except SQLAlchemyError:
            # Two replicas creating the lease row at once: one of them loses this round.
            return False

    async def _cursor(self) -> int | None:
        async with self._sessions() as session:
            lease = await repo.get_lease(session, CURSOR)
        return int(lease.holder) if lease is not None and lease.holder.isdigit() else None

    async def _advance(self, position: int) -> bool:
        """Move the cursor, in one transaction with renewing the lease; False if the lease was lost."""
        async with self._sessions() as session, session.begin():
            if not await repo.try_lease(session, LEASE, self.holder, ttl=self._ttl):
                return False
            await repo.set_lease_holder(session, CURSOR, str(position))
        return True

    async def _release(self) -> None:
        async with self._sessions() as session, session.begin():
            await repo.release_lease(session, LEASE, self.holder)

    @staticmethod
    async def _account_name(session: AsyncSession, account_id: str | None) -> str | None:
        if account_id is None:
            return None
        return await accounts_repo.account_name(session, account_id)  # None: the account was deleted since

    @staticmethod
    async def _message(session: AsyncSession, event: Event, code: object) -> str | None:
        """Azure's sanitised message, from the refresh_failed event written with the change."""
        if event.account_id is None or not isinstance(code, str):
            return None
        stored = await accounts_repo.latest_event_detail(
            session,
            event.account_id,
            "refresh_failed",
            before_id=event.id,
            since=event.created_at - MESSAGE_WINDOW,
        )
        try:
            detail = json.loads(stored) if stored else {}
        except ValueError:
            return None
        message = detail.get("message") if isinstance(detail, dict) else None
        return message if isinstance(message, str) and detail.get("code") == code else None


async def start(
    url: str,
    *,
    sessions: async_sessionmaker[AsyncSession],
    http: httpx.AsyncClient,
    settings: Settings,
    metrics: Metrics,
) -> Notifier:
    """Start delivering to ``url`` (from ``check_url``); close with ``Notifier.aclose()``."""
    notifier = Notifier(url=url, sessions=sessions, http=http, settings=settings, metrics=metrics)
    try:
        await notifier.prime()
    except SQLAlchemyError as exc:  # the loop primes it later; start-up need not fail for this
        log.warning("webhook cursor not created yet", extra={"error_type": type(exc).__name__})
    notifier.start()
    return notifier
