"""SQL of key rotation: batches of rows whose secrets are re-encrypted under the first key."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.models import Account, AccountCredential, AccountState, PendingAuthorization


async def account_ids_after(session: AsyncSession, after_id: str, *, limit: int) -> list[str]:
    """The next ``limit`` account ids after ``after_id``, in id order: one rotation batch."""
    rows = await session.execute(
        select(Account.id).where(Account.id > after_id).order_by(Account.id).limit(limit)
    )
    return list(rows.scalars())


async def lock_account_states(session: AsyncSession, account_ids: Sequence[str]) -> None:
    """Lock these accounts' token rows; taken before their seed rows, as a refresh does."""
    await session.execute(
        select(AccountState.account_id).where(AccountState.account_id.in_(account_ids)).with_for_update()
    )


async def account_secrets(
    session: AsyncSession, account_ids: list[str]
) -> list[tuple[str, str | None, str, str | None]]:
    """(id, CLIENT_SECRET, REFRESH_TOKEN, cached access token) of exactly these accounts (by id,
    not by range: an account created meanwhile inside the range must not push one out)."""
    rows = await session.execute(
        select(Account.id, Account.client_secret, Account.refresh_token, AccountState.access_token)
        .outerjoin(AccountState, AccountState.account_id == Account.id)
        .where(Account.id.in_(account_ids))
        .order_by(Account.id)
        .with_for_update(of=Account)
    )
    return [(r[0], r[1], r[2], r[3]) for r in rows]


async def credential_secrets(
    session: AsyncSession, account_ids: list[str]
) -> list[tuple[str, str | None, str | None]]:
    """(id, sealed certificate, sealed previous client secret) of these accounts' credentials rows."""
    rows = await session.execute(
        select(
            AccountCredential.account_id,
            AccountCredential.certificate,
            AccountCredential.previous_client_secret,
        )
        .where(AccountCredential.account_id.in_(account_ids))
        .with_for_update()
    )
    return [(i, c, p) for i, c, p in rows]


async def set_credential_secrets(
    session: AsyncSession, account_id: str, *, certificate: str | None, previous_client_secret: str | None
) -> None:
    await session.execute(
        update(AccountCredential)
        .where(AccountCredential.account_id == account_id)
        .values(certificate=certificate, previous_client_secret=previous_client_secret)
        .execution_options(synchronize_session=False)
    )


async def pending_verifiers_batch(
    session: AsyncSession, *, after: str, limit: int
) -> list[tuple[str, str, str]]:
    rows = await session.execute(
        select(
            PendingAuthorization.state_hash,
            PendingAuthorization.account_id,
            PendingAuthorization.code_verifier,
        )
        .where(PendingAuthorization.state_hash > after)
        .order_by(PendingAuthorization.state_hash)
        .limit(limit)
        .with_for_update()
    )
    return [(h, a, v) for h, a, v in rows]


async def set_pending_verifier(session: AsyncSession, state_hash: str, verifier: str) -> None:
    await session.execute(
        update(PendingAuthorization)
        .where(PendingAuthorization.state_hash == state_hash)
        .values(code_verifier=verifier)
        .execution_options(synchronize_session=False)
    )


async def set_account_secrets(
    session: AsyncSession, account_id: str, *, client_secret: str | None, refresh_token: str
) -> None:
    # Re-encryption leaves the plaintext unchanged, so VERSION is not bumped: an admin's
    # If-Match taken before a rotation stays valid.
    await session.execute(
        update(Account)
        .where(Account.id == account_id)
        .values(client_secret=client_secret, refresh_token=refresh_token)
        .execution_options(synchronize_session=False)
    )


async def set_state_token(session: AsyncSession, account_id: str, access_token: str | None) -> None:
    await session.execute(
        update(AccountState)
        .where(AccountState.account_id == account_id)
        .values(access_token=access_token)
        .execution_options(synchronize_session=False)
    )


async def sample_ciphertexts(session: AsyncSession, *, limit: int = 200) -> list[tuple[str, str, str]]:
    """(context column, row id, ciphertext) samples for the start-up key check."""
    samples: list[tuple[str, str, str]] = []
    rows = await session.execute(
        select(Account.id, Account.client_secret, Account.refresh_token).limit(limit)
    )
    for account_id, secret, refresh in rows:
        if secret:
            samples.append(("CLIENT_SECRET", account_id, secret))
        if refresh:
            samples.append(("REFRESH_TOKEN", account_id, refresh))
    return samples
