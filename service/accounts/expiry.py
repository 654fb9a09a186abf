"""Credential expiry: the stages an account passes before its secret or certificate expires, the
one notice per stage, and the counts monitoring reads.

Invariants: an account gets at most one event per stage (``30d``, ``7d``, ``1d``, then
``expired``), whichever replica scans first: the stage is claimed with a conditional update of
``expiry_notified`` in the same transaction as the event, so a second replica's claim finds it
taken. A stage skipped (an account created 5 days before expiry) is not sent late: only the most
urgent stage due goes out. A new secret or certificate (a new expiry date) starts over.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as repo

# (stage, time left at most): the most urgent first.
STAGES: tuple[tuple[str, timedelta], ...] = (
    ("expired", timedelta(0)),
    ("1d", timedelta(days=1)),
    ("7d", timedelta(days=7)),
    ("30d", timedelta(days=30)),
)
RANK = {None: 0, "30d": 1, "7d": 2, "1d": 3, "expired": 4}
WITHIN = ("30d", "7d", "expired")  # the metric's labels


def due_stage(expires_at: datetime, now: datetime) -> str | None:
    left = expires_at - now
    for stage, limit in STAGES:
        if left <= limit:
            return stage
    return None


def counts(expiries: list[tuple[str, str, datetime, str | None]], now: datetime) -> dict[str, int]:
    """Accounts expired, and expiring within 7 and 30 days (not yet expired; 30d includes 7d)."""
    out = dict.fromkeys(WITHIN, 0)
    for _id, _kind, expires_at, _notified in expiries:
        left = expires_at - now
        if left <= timedelta(0):
            out["expired"] += 1
            continue
        out["7d"] += left <= timedelta(days=7)
        out["30d"] += left <= timedelta(days=30)
    return out


async def scan(sessions: async_sessionmaker[AsyncSession], now: datetime) -> tuple[int, dict[str, int]]:
    """Write the notices due at ``now`` (naive UTC); returns how many, and the counts."""
    async with sessions() as session:
        expiries = await repo.credential_expiries(session)
    sent = 0
    for account_id, kind, expires_at, notified in expiries:
        stage = due_stage(expires_at, now)
        if stage is None or RANK[stage] <= RANK.get(notified, 0):
            continue
        async with sessions() as session, session.begin():
            if not await repo.claim_expiry_stage(
                session, account_id, expires_at=expires_at, was=notified, stage=stage
            ):
                continue  # another replica sent it, or the credential changed meanwhile
            detail = {
                "credential_type": kind,
                "expires_at": expires_at.isoformat() + "Z",
                "within": stage if stage != "expired" else None,
            }
            event = "credential_expired" if stage == "expired" else "credential_expiring"
            await repo.add_event(session, account_id=account_id, kind=event, detail=detail)
        sent += 1
    return sent, counts(expiries, now)
