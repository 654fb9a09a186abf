"""Accounts API basics through the ASGI app, on SQLite and MariaDB."""

from __future__ import annotations

from typing import Any

from tests.conftest import account_body, admin


async def test_create_and_read_account(running: Any) -> None:
    """A created account can be read back, with secrets write-only."""
    r = await running.client.post("/accounts", json=account_body(), headers=admin())
    assert r.status_code == 201, r.text
    got = await running.client.get(r.headers["Location"], headers=admin())
    assert got.status_code == 200
    assert got.json()["has_client_secret"] is True
    assert "client_secret" not in got.json()
