"""Re-encrypting every stored secret with the first key: online, in batches, resumable.

Each batch locks the accounts' token rows first and then their seed rows (the order a refresh
takes them, so the two never deadlock), re-encrypts what was made with another key, and commits.
A value already under the first key is left alone, so a rotation that stopped half-way simply
runs again. Plaintext never changes, so VERSION does not move and cached tokens stay valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.accounts import repository as accounts_repo
from service.kit import sealing
from service.kit.crypto import Keyring
from service.rotation import repository as repo

log = logging.getLogger("service.rotation")


@dataclass
class RotationReport:
    accounts: int = 0
    values: int = 0
    pending: int = 0


def _rotate(keyring: Keyring, column: str, row_id: str, stored: str | None) -> str | None:
    if not stored or not keyring.needs_rotation(stored):
        return stored
    return keyring.rotate(stored, context=sealing.context(column, row_id))


async def _batch(
    session: AsyncSession, keyring: Keyring, after_id: str, size: int, report: RotationReport
) -> str | None:
    ids = await repo.account_ids_after(session, after_id, limit=size)
    if not ids:
        return None
    await repo.lock_account_states(session, ids)
    rows = await repo.account_secrets(session, ids)
    for account_id, secret, refresh, access in rows:
        if account_id not in ids:
            continue
        new_secret = _rotate(keyring, sealing.CLIENT_SECRET, account_id, secret)
        new_refresh = _rotate(keyring, sealing.REFRESH_TOKEN, account_id, refresh) or ""
        new_access = _rotate(keyring, sealing.ACCESS_TOKEN, account_id, access)
        changed = (new_secret != secret) + (new_refresh != refresh) + (new_access != access)
        if changed:
            await repo.set_account_secrets(
                session, account_id, client_secret=new_secret, refresh_token=new_refresh
            )
            await repo.set_state_token(session, account_id, new_access)
            await accounts_repo.add_event(
                session, account_id=account_id, kind="keys_rotated", detail={"key_id": keyring.primary_key_id}
            )
            report.accounts += 1
            report.values += changed
    for account_id, cert, previous in await repo.credential_secrets(session, ids):
        new_cert = _rotate(keyring, sealing.CERTIFICATE, account_id, cert)
        new_previous = _rotate(keyring, sealing.PREVIOUS_CLIENT_SECRET, account_id, previous)
        changed = (new_cert != cert) + (new_previous != previous)
        if changed:
            await repo.set_credential_secrets(
                session, account_id, certificate=new_cert, previous_client_secret=new_previous
            )
            report.values += changed
    return ids[-1]


async def rotate_all(
    sessions: async_sessionmaker[AsyncSession], keyring: Keyring, *, batch: int = 100
) -> RotationReport:
    report = RotationReport()
    after = ""
    while True:
        async with sessions() as session, session.begin():
            last = await _batch(session, keyring, after, batch, report)
        if last is None:
            break
        after = last
    after = ""
    while True:
        async with sessions() as session, session.begin():
            rows = await repo.pending_verifiers_batch(session, after=after, limit=batch)
            for state_hash, _account_id, verifier in rows:
                rotated = _rotate(keyring, sealing.CODE_VERIFIER, state_hash, verifier)
                if rotated != verifier and rotated is not None:
                    await repo.set_pending_verifier(session, state_hash, rotated)
                    report.pending += 1
        if not rows:
            break
        after = rows[-1][0]
    log.info("rotation finished", extra={"count": report.values, "key_id": keyring.primary_key_id})
    return report
