"""The self-checking OAuth state: what the broker did not issue is refused without a query."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
import respx

from service.authorization.state import PURPOSE, StateSigner
from service.kit.crypto import Keyring, generate_key
from tests.conftest import account_body, admin, sql_statements

JSON = {"Accept": "application/json"}


async def _started(running: Any) -> str:
    r = await running.client.post("/accounts", json=account_body(refresh_token=None), headers=admin())
    assert r.status_code == 201, r.text
    r = await running.client.post(f"/accounts/{r.json()['id']}/authorize", headers=admin())
    assert r.status_code == 200, r.text
    state: str = r.json()["state"]
    return state


def _forgeries(running: Any, genuine: str) -> dict[str, str]:
    ident, expiry, mac = genuine.split(".")
    signer = StateSigner(running.ctx.keyring.derive(PURPOSE), clock=lambda: time.time() - 3600)
    other = StateSigner(Keyring.from_strings([generate_key()]).derive(PURPOSE))
    return {
        "random": secrets.token_urlsafe(32),
        "malformed": "forged-state",
        "bad_mac": f"{ident}.{expiry}.{mac[:-2]}AA",
        "longer_expiry": f"{ident}.{int(expiry) + 3600}.{mac}",
        "other_key": other.issue(600),
        "expired": signer.issue(600),
        "huge": "a" * 5000,
    }


async def test_unknown_forged_or_expired_state_costs_no_query(running: Any, azure: respx.MockRouter) -> None:
    """A state the broker did not issue, or an expired one, is 400 invalid_state with no SQL run."""
    genuine = await _started(running)
    for name, state in _forgeries(running, genuine).items():
        with sql_statements(running) as statements:
            params = {"code": "c", "state": state}
            r = await running.client.get("/oauth/callback", params=params, headers=JSON)
        assert (r.status_code, r.json()["code"]) == (400, "invalid_state"), name
        assert statements == [], name
    assert not azure.calls


async def test_genuine_state_is_still_looked_up(running: Any) -> None:
    """A state the broker issued passes the check and reaches the database (single use kept there)."""
    genuine = await _started(running)
    assert genuine.count(".") == 2
    assert StateSigner(running.ctx.keyring.derive(PURPOSE)).check(genuine)


def test_state_survives_a_key_rotation() -> None:
    """Issued under the old primary key, a state still checks on a ring that put a new key first."""
    old, new = generate_key(), generate_key()
    state = StateSigner(Keyring.from_strings([old]).derive(PURPOSE)).issue(600)
    assert StateSigner(Keyring.from_strings([new, old]).derive(PURPOSE)).check(state)
    assert not StateSigner(Keyring.from_strings([new]).derive(PURPOSE)).check(state)


@pytest.mark.parametrize("ttl", [-1, 0])
def test_state_at_or_past_its_expiry_is_refused(ttl: int) -> None:
    """The expiry is part of what the MAC covers and is enforced to the second."""
    signer = StateSigner(Keyring.from_strings([generate_key()]).derive(PURPOSE), clock=lambda: 1_800_000_000)
    assert not signer.check(signer.issue(ttl))
    assert signer.check(signer.issue(1))
