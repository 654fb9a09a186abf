"""A stored ciphertext only opens in the row and column it was sealed for, where the service stores it.

Each case copies one stored value, directly in the database (SQLite and MariaDB), to another
account's row or to another column of the same row, then asks the broker to use it. Reading values
back through the sealing functions cannot show this (a constant context would seal and unseal
alike); only a value moved behind the service's back can. The broker must refuse the moved value,
say why (``storage_unavailable``, reason ``decryption_failed``, naming the column), and never send
it to Azure AD: the strict respx router records every form that goes out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import respx
from sqlalchemy import select, update

from service.kit import timeutil
from service.models import Account, AccountState
from tests.conftest import TOKEN_URL_V1, account_body, admin, client, v1_token

SECRET_A, REFRESH_A, ACCESS_A = "cs-A-bound-secret~aaaa.1111", "0.AR-A-bound-refresh-1111", "at-A-bound-1111"
SECRET_B, REFRESH_B, ACCESS_B = "cs-B-bound-secret~bbbb.2222", "0.AR-B-bound-refresh-2222", "at-B-bound-2222"
VALUES = (SECRET_A, REFRESH_A, ACCESS_A, SECRET_B, REFRESH_B)
SEED_COLUMNS = {"CLIENT_SECRET": Account.client_secret, "REFRESH_TOKEN": Account.refresh_token}


@dataclass(frozen=True)
class Move:
    """Copy ``column`` of account ``source`` ("A" or "B") into ``target_column`` of account B."""

    source: str
    column: str
    target_column: str


SEED_MOVES = {
    "client secret to another account": Move("A", "CLIENT_SECRET", "CLIENT_SECRET"),
    "refresh token to another account": Move("A", "REFRESH_TOKEN", "REFRESH_TOKEN"),
    "client secret into the refresh token": Move("B", "CLIENT_SECRET", "REFRESH_TOKEN"),
    "refresh token into the client secret": Move("B", "REFRESH_TOKEN", "CLIENT_SECRET"),
}


def token_endpoint(forms: list[dict[str, str]]) -> Callable[[httpx.Request], httpx.Response]:
    """Azure AD answering each account's own refresh token, keeping every form it was sent."""

    def answer(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        forms.append(form)
        access = {REFRESH_A: ACCESS_A, REFRESH_B: ACCESS_B}.get(form.get("refresh_token", ""))
        if access is None:
            return httpx.Response(400, json={"error": "invalid_grant", "error_description": "AADSTS70008"})
        return httpx.Response(200, json=v1_token(access, None))

    return answer


async def two_accounts(running: Any) -> tuple[str, str]:
    ids = []
    for secret, refresh in ((SECRET_A, REFRESH_A), (SECRET_B, REFRESH_B)):
        r = await running.client.post(
            "/accounts", json=account_body(client_secret=secret, refresh_token=refresh), headers=admin()
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids[0], ids[1]


async def copy_seed_value(running: Any, move: Move, ids: dict[str, str]) -> None:
    async with running.ctx.engine.begin() as conn:
        stored = (
            await conn.execute(select(SEED_COLUMNS[move.column]).where(Account.id == ids[move.source]))
        ).scalar_one()
        assert stored.startswith("v1."), "the value is stored sealed"
        await conn.execute(
            update(Account).where(Account.id == ids["B"]).values({SEED_COLUMNS[move.target_column]: stored})
        )


def only_a_was_sent(forms: list[dict[str, str]]) -> bool:
    """Azure AD saw one form: A's own refresh, nothing of B's (nor A's values moved to B)."""
    return [(f.get("refresh_token"), f.get("client_secret")) for f in forms] == [(REFRESH_A, SECRET_A)]


@pytest.mark.parametrize("move", SEED_MOVES.values(), ids=SEED_MOVES.keys())
async def test_a_moved_seed_ciphertext_is_refused_and_never_sent(
    running: Any, azure: respx.MockRouter, move: Move
) -> None:
    """A secret copied to another row or column: the token endpoint says decryption_failed for that
    column and nothing of it (nor anything else of B) goes to Azure AD."""
    forms: list[dict[str, str]] = []
    azure.post(TOKEN_URL_V1).mock(side_effect=token_endpoint(forms))
    a, b = await two_accounts(running)
    r = await running.client.get(f"/accounts/{a}/token", headers=client())
    assert r.json()["access_token"] == ACCESS_A  # A's values open, and are what A sends
    await copy_seed_value(running, move, {"A": a, "B": b})

    r = await running.client.get(f"/accounts/{b}/token", headers=client())

    assert only_a_was_sent(forms), [sorted(f) for f in forms]
    assert r.status_code == 503, r.text
    problem = r.json()
    assert (problem["code"], problem["reason"]) == ("storage_unavailable", "decryption_failed")
    assert f"ms_dynamics_365_data.{move.target_column}" in problem["detail"]
    assert "another row or column" in problem["detail"]
    assert not [v for v in VALUES if v in r.text]


async def test_a_moved_seed_ciphertext_is_refused_by_the_code_exchange(
    running: Any, azure: respx.MockRouter
) -> None:
    """A pasted code for an account whose client secret was copied from another: refused before
    Azure AD is asked, with the column named."""
    forms: list[dict[str, str]] = []
    azure.post(TOKEN_URL_V1).mock(side_effect=token_endpoint(forms))
    a, b = await two_accounts(running)
    await copy_seed_value(running, SEED_MOVES["client secret to another account"], {"A": a, "B": b})
    r = await running.client.post(
        f"/accounts/{b}/authorization-code", json={"code": "0.AQ-bound-code-3333"}, headers=admin()
    )
    assert r.status_code == 503, r.text
    assert (r.json()["code"], r.json()["reason"]) == ("storage_unavailable", "decryption_failed")
    assert "ms_dynamics_365_data.CLIENT_SECRET" in r.json()["detail"]
    assert forms == []


async def test_a_cached_access_token_copied_to_another_account_is_never_served(
    running: Any, azure: respx.MockRouter
) -> None:
    """A's stored access token (and its expiry) copied onto B's token row: B does not serve it, it
    asks Azure AD with its own refresh token and serves its own token."""
    forms: list[dict[str, str]] = []
    azure.post(TOKEN_URL_V1).mock(side_effect=token_endpoint(forms))
    a, b = await two_accounts(running)
    assert (await running.client.get(f"/accounts/{a}/token", headers=client())).json()[
        "access_token"
    ] == ACCESS_A
    async with running.ctx.engine.begin() as conn:
        stored = (
            await conn.execute(select(AccountState.access_token).where(AccountState.account_id == a))
        ).scalar_one()
        assert stored.startswith("v1.")
        await conn.execute(
            update(AccountState)
            .where(AccountState.account_id == b)
            .values(
                access_token=stored,
                token_expires_at=timeutil.utcnow() + timedelta(hours=1),
                last_refreshed_at=timeutil.utcnow(),
            )
        )

    r = await running.client.get(f"/accounts/{b}/token", headers=client())

    assert r.status_code == 200, r.text
    assert r.json()["access_token"] == ACCESS_B
    assert [f["refresh_token"] for f in forms] == [REFRESH_A, REFRESH_B]
    assert forms[1]["client_secret"] == SECRET_B
