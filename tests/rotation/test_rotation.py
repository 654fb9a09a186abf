"""Key rotation and start-up key checks: online, resumable, and loud about a wrong key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import respx
from sqlalchemy import select

from service import migrate
from service.accounts import repository as accounts_repo
from service.errors import ConfigurationError
from service.kit import sealing, timeutil
from service.kit.crypto import Keyring, generate_key
from service.kit.db import create_engine, create_sessionmaker
from service.models import Account, AccountState
from service.rotation import repository as rotation_repo
from service.rotation.service import rotate_all
from tests.conftest import TOKEN_URL_V1, account_body, admin, client, make_settings, v1_token


async def stored_key_ids(settings: Any) -> set[str | None]:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            rows = (await session.execute(select(Account.client_secret, Account.refresh_token))).all()
            tokens = (await session.execute(select(AccountState.access_token))).scalars().all()
    finally:
        await engine.dispose()
    values = [v for row in rows for v in row if v] + [t for t in tokens if t]
    return {Keyring.key_id_of(v) for v in values}


async def test_rotate_then_drop_the_old_key(
    database_url: str, tmp_path: Path, run_app: Any, azure: respx.MockRouter
) -> None:
    """After rotate-keys every value is under the new key, and the old key can be removed."""
    await migrate.upgrade(database_url)
    old, new = generate_key(), generate_key()
    route = azure.post(TOKEN_URL_V1).respond(200, json=v1_token("cached-at", "rt-2"))
    settings_old = make_settings(database_url, tmp_path, encryption_keys=old)
    async with run_app(settings_old) as running:
        ids = []
        for _ in range(3):
            r = await running.client.post("/accounts", json=account_body(), headers=admin())
            ids.append(r.json()["id"])
            assert (
                await running.client.get(f"/accounts/{ids[-1]}/token", headers=client())
            ).status_code == 200
    old_id, new_id = Keyring.from_strings([old]).primary_key_id, Keyring.from_strings([new]).primary_key_id
    assert await stored_key_ids(settings_old) == {old_id}

    settings_both = make_settings(database_url, tmp_path, encryption_keys=f"{new},{old}")
    async with run_app(settings_both) as running:
        # Rotation runs while the service answers token requests.
        calls = [running.client.get(f"/accounts/{i}/token", headers=client()) for i in ids for _ in range(10)]
        report, *answers = await asyncio.gather(
            rotate_all(running.ctx.sessions, running.ctx.keyring, batch=2), *calls
        )
        assert all(a.status_code == 200 for a in answers)
        assert report.accounts == 3
        assert report.values == 9
    assert await stored_key_ids(settings_both) == {new_id}

    # Resumable: running it again finds nothing to do.
    engine = create_engine(settings_both)
    try:
        again = await rotate_all(create_sessionmaker(engine), Keyring.from_strings([new, old]))
    finally:
        await engine.dispose()
    assert again.values == 0

    settings_new = make_settings(database_url, tmp_path, encryption_keys=new)
    async with run_app(settings_new) as running:
        for account_id in ids:
            r = await running.client.get(f"/accounts/{account_id}/token", headers=client())
            assert r.json()["access_token"] == "cached-at"
        assert route.call_count == 3  # the stored tokens decrypted: no new IdP call


async def test_an_account_created_inside_a_batch_pushes_none_out(
    database_url: str, tmp_path: Path, run_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account created (under the new key) between a batch's id query and its secrets query,
    with an id inside the batch's range, does not push a locked account out of the batch: every
    old value is rotated, so the old key can go."""
    await migrate.upgrade(database_url)
    old, new = generate_key(), generate_key()
    async with run_app(make_settings(database_url, tmp_path, encryption_keys=old)) as running:
        for _ in range(2):
            assert (
                await running.client.post("/accounts", json=account_body(), headers=admin())
            ).status_code == 201
    settings_both = make_settings(database_url, tmp_path, encryption_keys=f"{new},{old}")
    keyring = Keyring.from_strings([new, old])
    lock = rotation_repo.lock_account_states
    created: list[str] = []

    async def lock_then_someone_creates(session: Any, account_ids: list[str]) -> None:
        await lock(session, account_ids)
        if not created:  # in the same transaction: the next query sees it, on SQLite as on MySQL
            account_id = account_ids[0] + "-created-meanwhile"
            sealed = sealing.seal(keyring, sealing.CLIENT_SECRET, account_id, "new-secret")
            account = Account(
                id=account_id,
                version=1,
                default_account=False,
                tenant_id="t",
                name="meanwhile",
                client_id="c",
                client_secret=sealed,
                refresh_token="",
                authorization_url="https://login.microsoftonline.com/t/oauth2/authorize",
                token_url="https://login.microsoftonline.com/t/oauth2/token",
                api_url="https://org.crm.dynamics.com/api/data/v9.2",
            )
            now = timeutil.utcnow()
            state = AccountState(account_id=account_id, created_at=now, updated_at=now)
            await accounts_repo.insert_account(session, account, state)
            created.append(account_id)

    monkeypatch.setattr(rotation_repo, "lock_account_states", lock_then_someone_creates)
    engine = create_engine(settings_both)
    try:
        report = await rotate_all(create_sessionmaker(engine), keyring, batch=2)
    finally:
        await engine.dispose()
    assert created
    assert report.accounts == 2
    assert await stored_key_ids(settings_both) == {keyring.primary_key_id}


async def test_wrong_key_refuses_to_start_naming_the_key_id(
    database_url: str, tmp_path: Path, run_app: Any
) -> None:
    """Start-up with a key that did not encrypt the stored secrets fails, naming the needed key id."""
    await migrate.upgrade(database_url)
    right, wrong = generate_key(), generate_key()
    async with run_app(make_settings(database_url, tmp_path, encryption_keys=right)) as running:
        await running.client.post("/accounts", json=account_body(), headers=admin())
    needed = Keyring.from_strings([right]).primary_key_id
    with pytest.raises(ConfigurationError, match=needed):
        async with run_app(make_settings(database_url, tmp_path, encryption_keys=wrong)):
            pass
    # Nothing was changed by the failed start: the right key still works.
    async with run_app(make_settings(database_url, tmp_path, encryption_keys=right)) as running:
        assert (await running.client.get("/accounts", headers=admin())).json()["items"][0][
            "has_client_secret"
        ]


def test_mysql_without_encryption_keys_is_refused(tmp_path: Path) -> None:
    """With MySQL, BROKER_ENCRYPTION_KEYS is required (replicas must share keys)."""
    from service.bootstrap import load_keyring

    settings = make_settings("mysql+aiomysql://root@127.0.0.1/x", tmp_path, encryption_keys=None)
    with pytest.raises(ConfigurationError, match="BROKER_ENCRYPTION_KEYS is required"):
        load_keyring(settings)


def test_cli_generate_key_and_rotate_keys(tmp_path: Path) -> None:
    """`token-broker generate-key` prints a key as its last line; `rotate-keys` runs on a database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    gen = subprocess.run(
        [sys.executable, "-m", "service.cli", "generate-key"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    key = gen.stdout.strip().splitlines()[-1]
    Keyring.from_strings([key])
    env |= {
        "BROKER_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}",
        "BROKER_ENCRYPTION_KEYS": key,
        "BROKER_VAR_DIR": str(tmp_path / "var"),
    }
    subprocess.run([sys.executable, "-m", "service.cli", "migrate"], capture_output=True, env=env, check=True)
    rotated = subprocess.run(
        [sys.executable, "-m", "service.cli", "rotate-keys"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "re-encrypted 0 values" in rotated.stdout
    assert key not in rotated.stdout + rotated.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "service.cli", "rotate-keys"],
        capture_output=True,
        text=True,
        env={**env, "BROKER_ENCRYPTION_KEYS": "not-a-key"},
        check=False,
    )
    assert bad.returncode == 2
    assert "entry 1 is not a valid key" in bad.stderr
    assert "not-a-key" not in bad.stderr


async def test_certificates_and_previous_secrets_are_rotated_too(
    database_url: str, tmp_path: Path, run_app: Any
) -> None:
    """rotate-keys re-encrypts the broker's credentials row (the certificate PEM and a replaced
    secret kept as the previous one) under the first key, still bound to its row and column."""
    from service.models import AccountCredential
    from tests.certs import make_cert

    await migrate.upgrade(database_url)
    old, new = generate_key(), generate_key()
    pem = make_cert().pem()
    cc = {"grant_type": "client_credentials", "refresh_token": None, "client_secret": None}
    async with run_app(make_settings(database_url, tmp_path, encryption_keys=old)) as running:
        r = await running.client.post(
            "/accounts",
            json=account_body(**cc, credential_type="certificate", certificate=pem),
            headers=admin(),
        )
        with_cert = r.json()["id"]
        r = await running.client.post("/accounts", json=account_body(), headers=admin())
        rotated = r.json()["id"]
        await running.client.patch(
            f"/accounts/{rotated}", json={"client_secret": "n3w-secret"}, headers=admin()
        )
    both = make_settings(database_url, tmp_path, encryption_keys=f"{new},{old}")
    engine = create_engine(both)
    try:
        keyring = Keyring.from_strings([new, old])
        await rotate_all(create_sessionmaker(engine), keyring)
        async with create_sessionmaker(engine)() as session:
            rows = {c.account_id: c for c in (await session.execute(select(AccountCredential))).scalars()}
    finally:
        await engine.dispose()
    cert, previous = rows[with_cert].certificate, rows[rotated].previous_client_secret
    assert cert is not None
    assert previous is not None
    only_new = Keyring.from_strings([new])
    assert {Keyring.key_id_of(cert), Keyring.key_id_of(previous)} == {only_new.primary_key_id}
    assert sealing.unseal(only_new, sealing.CERTIFICATE, with_cert, cert) == pem
    assert (
        sealing.unseal(only_new, sealing.PREVIOUS_CLIENT_SECRET, rotated, previous)
        == account_body()["client_secret"]
    )
