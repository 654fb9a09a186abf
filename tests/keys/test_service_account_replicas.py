"""Service-account bindings across replicas: a new binding works on the other at once, a deleted one
is refused there within 5 s (the periodic sync), with real processes (``tests/replicas.py``) on
MariaDB and in-process apps on one SQLite file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service import migrate
from tests.conftest import ADMIN_KEY, ENCRYPTION_KEY, admin, make_settings
from tests.keys.fake_issuer import FakeIssuerHandle, SigningKey, claims_for, running_fake_issuer
from tests.replicas import ReplicaSet, broker_env
from tests.replicas import migrate as migrate_env

NS, SA = "contact-center", "workflow-engine"
BOUND = 5.0  # DESIGN.md: a deleted binding is refused on every replica within 5 s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def issuer() -> Iterator[FakeIssuerHandle]:
    with running_fake_issuer() as handle:
        yield handle


async def _refused_within(client: httpx.AsyncClient, token: str, started: float) -> float:
    """Poll GET /accounts with ``token`` until 401; the seconds since ``started``."""
    while (await client.get("/accounts", headers=bearer(token))).status_code != 401:
        assert time.monotonic() - started < BOUND, "still accepted after the bound"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def _scenario(a: httpx.AsyncClient, b: httpx.AsyncClient, issuer: FakeIssuerHandle) -> float:
    key = SigningKey("RS256")
    issuer.publish(key)
    r = await a.post(
        "/service-accounts", json={"namespace": NS, "name": SA, "role": "admin"}, headers=admin()
    )
    assert r.status_code == 201, r.text
    binding = r.json()
    token = key.sign(claims_for(issuer.url, NS, SA))
    assert (await a.get("/accounts", headers=bearer(token))).status_code == 200
    assert (await b.get("/accounts", headers=bearer(token))).status_code == 200  # at once, no sync waited
    assert (await b.get("/accounts", headers=bearer(token))).status_code == 200  # remembered
    started = time.monotonic()
    assert (await a.delete(f"/service-accounts/{binding['id']}", headers=admin())).status_code == 204
    assert (await a.get("/accounts", headers=bearer(token))).status_code == 401
    return await _refused_within(b, token, started)


@pytest.mark.mysql
async def test_a_deleted_binding_is_refused_on_every_replica_within_5_s(
    mysql_url: str, tmp_path: Path, issuer: FakeIssuerHandle
) -> None:
    """Two `token-broker serve` processes on MariaDB at the default 5 s sync: a binding made on A
    works on B at once; deleted on A, its remembered token is refused on A at once and on B within 5 s."""
    env = broker_env(
        {
            "BROKER_DATABASE_URL": mysql_url,
            "BROKER_ENCRYPTION_KEYS": ENCRYPTION_KEY,
            "BROKER_ADMIN_KEYS": ADMIN_KEY,
            "BROKER_ALLOW_HTTP": "true",
            "BROKER_VAR_DIR": str(tmp_path / "var"),
            "BROKER_LOG_LEVEL": "WARNING",
            "BROKER_K8S_ISSUER": issuer.url,
        }
    )
    migrate_env(env)
    with ReplicaSet(env, 2, tmp_path / "logs") as replicas:
        async with (
            httpx.AsyncClient(base_url=replicas[0].url, timeout=10, trust_env=False) as a,
            httpx.AsyncClient(base_url=replicas[1].url, timeout=10, trust_env=False) as b,
        ):
            took = await _scenario(a, b, issuer)
        output = replicas.output()
    assert took < BOUND
    assert "eyJ" not in output  # no token in any log line


async def test_bindings_across_two_apps_on_one_database(
    sqlite_url: str, tmp_path: Path, issuer: FakeIssuerHandle, run_app: Callable[..., Any]
) -> None:
    """The same with two in-process apps on one SQLite file (B syncing every second)."""
    await migrate.upgrade(sqlite_url)
    common = {"k8s_issuer": issuer.url, "allow_http": True}
    async with (
        run_app(make_settings(sqlite_url, tmp_path / "a", **common)) as a,
        run_app(make_settings(sqlite_url, tmp_path / "b", sync_interval_seconds=1.0, **common)) as b,
    ):
        took = await _scenario(a.client, b.client, issuer)
    assert took < BOUND
